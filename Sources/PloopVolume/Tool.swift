import Foundation
import PloopSystem

/// The e2fsprogs and util-linux programs a file-system disk needs, run with their output kept
/// for the error message.
public enum Tool {
    static let directories = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]

    /// The program's path, or nil when it is not installed.
    public static func path(_ name: String) -> String? {
        directories.map { $0 + "/" + name }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    public struct Result {
        public var status: Int32
        public var stdout: String
        public var stderr: String
    }

    /// Runs `name args`; the status is returned, not judged.
    /// `output` hears the standard output as it comes (for progress).
    public static func status(_ name: String, _ args: [String], code: Int32, output: ((ArraySlice<UInt8>) -> Void)? = nil) throws(VolumeError) -> Result {
        guard let exe = path(name) else {
            throw VolumeError("\(name) is not installed (it comes with e2fsprogs or util-linux): install it and run the command again", code: code)
        }
        var environment = Spawn.environment
        environment["LC_ALL"] = "C"
        let r: Spawn.Output
        do { r = try Spawn.run(exe, arguments: [exe] + args, environment: environment, output: output) } catch {
            throw VolumeError("cannot run \(exe): \(error)", code: code)
        }
        return Result(
            status: r.termination.status, stdout: String(decoding: r.standardOutput, as: UTF8.self),
            stderr: String(decoding: r.standardError, as: UTF8.self))
    }

    /// Runs `name args` and returns its output; a non-zero status is an error with `code`.
    @discardableResult
    public static func run(_ name: String, _ args: [String], code: Int32, output: ((ArraySlice<UInt8>) -> Void)? = nil) throws(VolumeError) -> String {
        let r = try status(name, args, code: code, output: output)
        guard r.status == 0 else {
            let text = (r.stderr.isEmpty ? r.stdout : r.stderr).trimmingCharacters(in: .whitespacesAndNewlines)
            throw VolumeError("\(name) \(args.joined(separator: " ")) failed (exit \(r.status)): \(text)", code: code)
        }
        return r.stdout
    }
}
