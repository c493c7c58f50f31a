import ArgumentParser
import Foundation
import PloopDevice
import PloopSimulator

/// `--backend auto|kernel|simulator` (or `PLOOP_BACKEND`).
enum BackendChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, kernel, simulator

    /// The backend to use. `auto` is the kernel driver when its module is loaded, else the
    /// simulator; the kernel backend is not part of this build yet.
    func resolve() throws -> any DeviceBackend {
        let env = ProcessInfo.processInfo.environment["PLOOP_BACKEND"].flatMap(BackendChoice.init(rawValue:))
        let choice = self == .auto ? (env ?? .auto) : self
        switch choice {
        case .kernel:
            throw CommandFailure("the kernel backend is not available in this build yet; use --backend simulator")
        case .simulator, .auto:
            if choice == .auto, FileManager.default.fileExists(atPath: "/sys/module/ploop") {
                FileHandle.standardError.write("ploop: the ploop kernel module is loaded, but this build serves devices with the simulator\n")
            }
            if let why = SimulatorBackend.unavailableReason() { throw CommandFailure("cannot serve devices here: \(why)") }
            return SimulatorBackend()
        }
    }
}

struct BackendOptions: ParsableArguments {
    @Option(help: "Device backend: auto (the kernel driver if loaded, else the simulator), kernel or simulator. Also PLOOP_BACKEND.")
    var backend: BackendChoice = .auto
}

/// A file system mounted on a device node, from /proc/mounts.
enum Mounts {
    struct Entry {
        var source: String
        var target: String
    }

    static func all() -> [Entry] {
        guard let text = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ")
            guard f.count >= 2 else { return nil }
            return Entry(source: unescape(String(f[0])), target: unescape(String(f[1])))
        }
    }

    static func unescape(_ s: String) -> String {
        s.replacingOccurrences(of: "\\040", with: " ").replacingOccurrences(of: "\\011", with: "\t")
    }

    /// The device whose file system is mounted at `mountPoint`.
    static func device(at mountPoint: String) -> String? {
        let target = URL(fileURLWithPath: mountPoint).standardizedFileURL.path
        return all().last { $0.target == target }?.source
    }

    static func mountPoints(of device: String) -> [String] {
        all().filter { $0.source == device }.map(\.target)
    }

    static func run(_ args: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/" + args[0])
        if !FileManager.default.isExecutableFile(atPath: p.executableURL!.path) {
            p.executableURL = URL(fileURLWithPath: "/usr/bin/" + args[0])
        }
        p.arguments = Array(args.dropFirst())
        let err = Pipe()
        p.standardError = err
        try p.run()
        p.waitUntilExit()
        if p.terminationStatus != 0 {
            let msg = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            throw CommandFailure("\(args.joined(separator: " ")) failed: \(msg.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
    }
}
