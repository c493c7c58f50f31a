import ArgumentParser
import Foundation
import PloopDevice
import PloopKernel
import PloopSimulator

/// `--backend auto|kernel|simulator` (or `PLOOP_BACKEND`).
enum BackendChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, kernel, simulator

    /// The backend to use. `auto` is the kernel driver when its module is loaded, else the
    /// simulator.
    func resolve() throws -> any DeviceBackend {
        let environment = ProcessInfo.processInfo.environment
        var env: BackendChoice?
        if let text = environment["PLOOP_BACKEND"], !text.isEmpty {
            guard let choice = BackendChoice(rawValue: text) else {
                throw CommandFailure("PLOOP_BACKEND=\(text) is not a backend: use auto, kernel or simulator (or unset it)")
            }
            env = choice
        }
        var choice = self == .auto ? (env ?? .auto) : self
        if choice == .auto {
            choice = KernelDeviceState.module().loaded ? .kernel : .simulator
        }
        switch choice {
        case .kernel:
            // A test hook: the kernel backend's ioctls answered by the fake driver over the
            // simulator's devices, so the whole tool can run through KernelBackend here.
            if environment["PLOOP_KERNEL_FAKE"] == "simulator" {
                if let why = SimulatorBackend.unavailableReason() { throw CommandFailure("cannot serve devices here: \(why)") }
                let paths = RuntimePaths()
                return KernelBackend(transport: FakeKernel(lower: SimulatorBackend(paths: paths), sysfsRoot: paths.root + "/fake-kernel"))
            }
            if let why = KernelBackend.unavailableReason() { throw CommandFailure("cannot use the kernel backend: \(why)") }
            return KernelBackend()
        case .simulator, .auto:
            if let why = SimulatorBackend.unavailableReason() { throw CommandFailure("cannot serve devices here: \(why)") }
            return SimulatorBackend()
        }
    }
}

struct BackendOptions: ParsableArguments {
    @Option(help: "Device backend: auto (the kernel driver if its module is loaded, else the simulator), kernel or simulator. Also PLOOP_BACKEND.")
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

    /// Mount points of `device` and of its partitions (`/dev/ploopNpM`), in mount order.
    static func mountPoints(ofDeviceOrPartitions device: String) -> [String] {
        all().filter { e in
            guard e.source.hasPrefix(device) else { return false }
            let rest = e.source.dropFirst(device.count)
            let number = rest.dropFirst()
            return rest.isEmpty || (rest.first == "p" && !number.isEmpty && number.allSatisfy { $0.isASCII && $0.isNumber })
        }.map(\.target)
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
