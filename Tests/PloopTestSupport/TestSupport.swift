import Foundation
import PloopSystem

/// Helpers shared by the test targets: run the built `ploop` (and qemu's tools), scratch
/// directories removed by exact path, file snapshots to prove nothing was touched.
public enum TestSupport {
    /// The package root, from this file's location.
    public static let packageRoot: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The `ploop` binary `swift build` made next to the tests.
    public static var ploopBinary: String {
        // PLOOP_TEST_BINARY runs the command-level tests against another build (an older one, to
        // see a regression test fail there).
        if let other = ProcessInfo.processInfo.environment["PLOOP_TEST_BINARY"], !other.isEmpty { return other }
        let candidates = [
            packageRoot.appendingPathComponent(".build/debug/ploop").path,
            URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("ploop").path,
        ]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates[0]
    }

    public struct Result: Sendable, CustomStringConvertible {
        public var code: Int32
        public var stdout: String
        public var stderr: String
        /// The signal that ended the program (a trap is SIGILL or SIGTRAP), if one did.
        public var signal: Int32? = nil
        public init(code: Int32, stdout: String, stderr: String, signal: Int32? = nil) {
            self.code = code
            self.stdout = stdout
            self.stderr = stderr
            self.signal = signal
        }
        public var description: String { "exit \(code)\(signal.map { " (signal \($0))" } ?? "")\nstdout: \(stdout)\nstderr: \(stderr)" }
    }

    /// The device backends the command-level tests run under: the simulator, the kernel backend
    /// with its ioctls answered by the fake driver over the simulator's devices, and the dm-ploop
    /// backend with device-mapper answered by the fake over the simulator's devices. Where the
    /// ploop kernel module is loaded, the real driver joins them.
    /// `PLOOP_TEST_CLI_BACKENDS=dm-fake,simulator` keeps only those (a developer's quicker run).
    public static let cliBackends: [String] = {
        let all = ["simulator", "kernel-fake", "dm-fake"] + (FileManager.default.fileExists(atPath: "/sys/module/ploop") ? ["kernel"] : [])
        guard let only = ProcessInfo.processInfo.environment["PLOOP_TEST_CLI_BACKENDS"], !only.isEmpty else { return all }
        let keep = Set(only.split(separator: ",").map(String.init))
        return all.filter(keep.contains)
    }()

    /// The backends of `cliBackends` with the legacy driver's balloon ioctls (dm-ploop has none).
    public static let balloonBackends = cliBackends.filter { $0 != "dm-fake" }

    /// Environment every program started by `run` gets (the backend under test).
    @TaskLocal public static var backendEnvironment: [String: String] = [:]

    /// Runs `body` with every `ploop` it starts using the named backend (see `cliBackends`).
    public static func withBackend<T>(_ name: String, _ body: () throws -> T) rethrows -> T {
        let env =
            switch name {
            case "kernel-fake": ["PLOOP_BACKEND": "kernel", "PLOOP_KERNEL_FAKE": "simulator"]
            case "dm-fake": ["PLOOP_BACKEND": "dm", "PLOOP_DM_FAKE": "simulator"]
            default: ["PLOOP_BACKEND": name]
            }
        return try $backendEnvironment.withValue(env, operation: body)
    }

    /// Runs a program to completion, capturing its output. Through PloopSystem's `Spawn`, as the
    /// tool starts its own children: an empty signal mask and default dispositions, whatever the
    /// test runner blocked (a shell's `wait` hung on an inherited blocked SIGCHLD once).
    public static func run(_ executable: String, _ arguments: [String], cwd: String? = nil, environment: [String: String]? = nil) throws -> Result {
        let extra = backendEnvironment.merging(environment ?? [:]) { $1 }
        let env = ProcessInfo.processInfo.environment.merging(extra) { $1 }
        let r = try Spawn.run(executable, arguments: [executable] + arguments, environment: env, directory: cwd)
        let out = String(decoding: r.standardOutput, as: UTF8.self), err = String(decoding: r.standardError, as: UTF8.self)
        switch r.termination {
        case .exited(let code): return Result(code: code, stdout: out, stderr: err)
        case .signaled(let s): return Result(code: s, stdout: out, stderr: err, signal: s)
        }
    }

    public static func ploop(_ arguments: String..., cwd: String? = nil) throws -> Result {
        try run(ploopBinary, arguments, cwd: cwd)
    }

    public static func ploop(_ arguments: [String], cwd: String? = nil) throws -> Result {
        try run(ploopBinary, arguments, cwd: cwd)
    }

    /// The address-space limit the hostile-input cases run under: an allocation bug fails there
    /// instead of slowing the machine down.
    public static let addressSpaceLimitKiB = 3 * 1024 * 1024

    /// `ploop` under `ulimit -v` (3 GiB), with stdin from `input` (else /dev/null). A signal that
    /// ends it is reported in `signal` (sh execs it, so nothing stands between).
    public static func ploopLimited(_ arguments: [String], cwd: String? = nil, input: String? = nil) throws -> Result {
        let redirect = input.map { " < '\($0)'" } ?? ""
        return try run("/bin/sh", ["-c", "ulimit -v \(addressSpaceLimitKiB); exec \"$0\" \"$@\"\(redirect)", ploopBinary] + arguments, cwd: cwd)
    }

    /// The full path of a tool, or nil if it is not installed.
    public static func which(_ tool: String) -> String? {
        for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
            let p = dir + "/" + tool
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    public static var isRoot: Bool { getuid() == 0 }
}

/// A scratch directory under /tmp, removed (by its exact path) when the object goes away.
public final class ScratchDirectory: @unchecked Sendable {
    public let path: String

    public init(_ name: String = "ploop-test") throws {
        let template = NSTemporaryDirectory() + "\(name)-XXXXXX"
        var bytes = Array(template.utf8CString)
        guard let made = mkdtemp(&bytes) else { throw CocoaError(.fileWriteUnknown) }
        path = String(cString: made)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    public func file(_ name: String) -> String { path + "/" + name }

    /// Every file in the directory with its bytes, to prove a failed command touched nothing.
    public func snapshot() throws -> [String: Data] {
        var out: [String: Data] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: path) {
            var isDir: ObjCBool = false
            let p = file(name)
            if FileManager.default.fileExists(atPath: p, isDirectory: &isDir), isDir.boolValue {
                out[name] = Data("<dir>".utf8)
            } else {
                out[name] = FileManager.default.contents(atPath: p) ?? Data("<unreadable>".utf8)
            }
        }
        return out
    }

    public func write(_ name: String, _ bytes: [UInt8]) {
        _ = FileManager.default.createFile(atPath: file(name), contents: Data(bytes))
    }

    public func read(_ name: String) -> [UInt8] {
        [UInt8](FileManager.default.contents(atPath: file(name)) ?? Data())
    }
}

/// Serialises tests that use real devices (loop, FUSE, /dev nodes), across suites and targets, so
/// each can tell what it created and the 2-core machine is not oversubscribed.
public enum DeviceTestLock {
    private static let semaphore = DispatchSemaphore(value: 1)
    public static func acquire() { semaphore.wait() }
    public static func release() { semaphore.signal() }
    public static func run<T>(_ body: () throws -> T) rethrows -> T {
        acquire()
        defer { release() }
        return try body()
    }
}

extension TestSupport {
    /// Runs a tool and fails the test's expectations with its output when it exits non-zero.
    @discardableResult
    public static func sh(_ tool: String, _ args: String...) throws -> Result {
        try run(which(tool) ?? "/usr/bin/\(tool)", args)
    }

    /// Why the real simulator stack cannot run here, or nil.
    public static var simulatorUnavailable: String? {
        if getuid() != 0 { return "needs root (FUSE, loop devices, /dev nodes)" }
        if access("/dev/fuse", R_OK | W_OK) != 0 { return "/dev/fuse is missing" }
        if access("/dev/loop-control", R_OK | W_OK) != 0 { return "/dev/loop-control is missing" }
        if which("mkfs.ext4") == nil { return "mkfs.ext4 is missing (apt-get install e2fsprogs)" }
        return nil
    }

    /// Whether this process may resize a mounted ext4 (online resize needs CAP_SYS_RESOURCE).
    public static var canResizeOnline: Bool {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
            let line = status.split(separator: "\n").first(where: { $0.hasPrefix("CapEff:") }),
            let caps = UInt64(line.split(separator: "\t").last ?? "", radix: 16)
        else { return false }
        return caps & (1 << 24) != 0
    }
}

/// Every file of a folder with its bytes (lock files aside), to prove a refused command changed
/// nothing.
public struct ScratchDirectoryState: Equatable {
    public var files: [String: Data]
    public init(_ dir: String) throws {
        files = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: dir) where !name.hasSuffix(".lck") {
            files[name] = FileManager.default.contents(atPath: dir + "/" + name) ?? Data()
        }
    }
}
