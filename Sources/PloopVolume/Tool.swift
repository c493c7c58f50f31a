import Foundation
#if canImport(Glibc)
import Glibc
#endif

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
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        var env = ProcessInfo.processInfo.environment
        env["LC_ALL"] = "C"
        p.environment = env
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        do { try p.run() } catch { throw VolumeError("cannot run \(exe): \(error)", code: code) }
        // Read both pipes while it runs: a chatty tool would block on a full pipe otherwise.
        let errData = Handoff()
        let t = Thread { errData.set(err.fileHandleForReading.readDataToEndOfFile()) }
        t.start()
        var o = Data()
        let fd = out.fileHandleForReading.fileDescriptor
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            o.append(contentsOf: chunk[0..<n])
            output?(chunk[0..<n])
        }
        p.waitUntilExit()
        let e = errData.wait()
        return Result(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
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

/// A value handed from a reader thread to the caller once.
final class Handoff: @unchecked Sendable {
    private let cond = NSCondition()
    private var value: Data?
    func set(_ d: Data) {
        cond.lock()
        value = d
        cond.signal()
        cond.unlock()
    }
    func wait() -> Data {
        cond.lock()
        while value == nil { cond.wait() }
        let v = value!
        cond.unlock()
        return v
    }
}
