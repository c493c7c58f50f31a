import Glibc
import Synchronization

/// Test hooks for crash and fault tests of whole commands. Each change a process makes to a file
/// (write, sync, truncate, fallocate, rename, unlink) is a numbered step, from 1.
///
/// - `PLOOP_TEST_CRASH_AT=N`: the process ends at once (`_exit(137)`, as if killed: no cleanup,
///   no signal handlers) just before step N. Everything before it happened; nothing after.
/// - `PLOOP_TEST_FAULT=ERRNO@N` (`EIO@7`, `ENOSPC@12`): step N fails with that errno instead of
///   doing anything, as a failing or full disk would; the steps after it run normally.
///   `ERRNO@N+` fails step N and every step after it (a disk that stays bad).
///
/// A fault that fires says so on stderr (`ploop-test: injected ENOSPC at step 7 (write PATH)`),
/// so a test knows it was reached even where the command handles the error. Unset, each costs
/// one load per call.
public enum CrashPoint {
    /// The environment variables; processes a command starts for good (device daemons) get neither.
    public static let variable = "PLOOP_TEST_CRASH_AT"
    public static let faultVariable = "PLOOP_TEST_FAULT"

    /// The same hooks for the device daemon a command starts, under names of their own: `ploop
    /// mount` run with `PLOOP_TEST_DAEMON_CRASH_AT=N` starts a daemon that ends at its own Nth
    /// change, counted from its start (the in-use mark, state files, guest writes, maintenance),
    /// as a daemon killed there would; `PLOOP_TEST_DAEMON_FAULT` and `PLOOP_TEST_DAEMON_RECORD`
    /// likewise. The command itself ignores them.
    public static let daemonVariables = [
        "PLOOP_TEST_DAEMON_CRASH_AT": variable, "PLOOP_TEST_DAEMON_FAULT": faultVariable, "PLOOP_TEST_DAEMON_RECORD": ChangeRecorder.variable,
    ]

    /// The environment of a daemon started from a command's `environment`: the command's own
    /// hooks left out (the daemon must outlive a killed command, as a real one does), the
    /// daemon's hooks under the names the daemon reads.
    public static func daemonEnvironment(_ environment: [String: String]) -> [String: String] {
        var out = environment.filter { ![variable, faultVariable, ChangeRecorder.variable].contains($0.key) && daemonVariables[$0.key] == nil }
        for (hook, own) in daemonVariables { if let v = environment[hook] { out[own] = v } }
        return out
    }

    /// A parsed `PLOOP_TEST_FAULT`.
    public struct Fault: Sendable, Equatable {
        public var errno: Int32
        public var step: Int
        public var sticky: Bool

        /// The errnos a fault may name: what a disk returns.
        public static let names: [String: Int32] = ["EIO": EIO, "ENOSPC": ENOSPC, "EDQUOT": EDQUOT, "EROFS": EROFS]

        public init?(_ text: String) {
            let parts = text.split(separator: "@", omittingEmptySubsequences: false)
            guard parts.count == 2, let e = Self.names[String(parts[0])] else { return nil }
            var n = Substring(parts[1])
            sticky = n.hasSuffix("+")
            if sticky { n = n.dropLast() }
            guard let s = Int(n), s > 0 else { return nil }
            errno = e
            step = s
        }

        public func fails(_ n: Int) -> Bool { sticky ? n >= step : n == step }
    }

    private static let limit: Int? = {
        guard let v = getenv(variable) else { return nil }
        return Int(String(cString: v))
    }()
    private static let fault: Fault? = {
        guard let v = getenv(faultVariable) else { return nil }
        return Fault(String(cString: v))
    }()
    private static let armed = limit != nil || fault != nil
    /// True when a crash or fault hook, or the change recorder, watches this process's file
    /// changes: I/O that bypasses `File` (asynchronous direct I/O) must not happen then, or its
    /// changes would go uncounted and unrecorded.
    public static var watching: Bool { armed || ChangeRecorder.active }
    private static let count = Atomic<Int>(0)

    /// One step: `call` about to change `path`. Ends the process or throws the injected error
    /// when a hook says so.
    @inline(__always)
    public static func step(_ call: String, _ path: String) throws(SystemError) {
        guard armed else { return }
        let n = count.add(1, ordering: .relaxed).newValue
        if let limit, n >= limit { _exit(137) }
        if let fault, fault.fails(n) {
            let name = Fault.names.first { $0.value == fault.errno }?.key ?? "\(fault.errno)"
            let note = Array("ploop-test: injected \(name) at step \(n) (\(call) \(path))\n".utf8)
            _ = note.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
            throw SystemError(call, path: path, errno: fault.errno)
        }
    }
}

/// `PLOOP_TEST_RECORD=FILE`: every change a process makes to files (data, syncs, creates,
/// renames, unlinks) is appended to FILE with its bytes, in the order made, for a test to build
/// the states a power cut could leave (Tests/PloopCommandsTests/FolderPowerCutTests.swift).
/// A record: op (u8), path length (u32), path, a (u64), b (u64), data length (u64), data; all
/// little-endian. Unset, each costs one load per call.
public enum ChangeRecorder {
    public static let variable = "PLOOP_TEST_RECORD"

    public enum Op: UInt8, Sendable {
        /// a = offset; data = the bytes.
        case write = 1
        /// fsync or fdatasync of a file or a folder.
        case sync = 2
        /// a = length.
        case truncate = 3
        /// fallocate mode 0 (the file grows to a + b if shorter).
        case allocate = 4
        /// punch a hole (or zero a range) in [a, a + b), size kept.
        case zero = 5
        /// a new file at path.
        case create = 6
        /// path renamed to data (the new path's bytes).
        case rename = 7
        case unlink = 8
    }

    private static let fd: Int32? = {
        guard let v = getenv(variable) else { return nil }
        let fd = open(v, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        return fd >= 0 ? fd : nil
    }()
    private static let lock = Mutex(())

    @inline(__always)
    public static var active: Bool { fd != nil }

    public static func record(_ op: Op, _ path: String, _ a: UInt64 = 0, _ b: UInt64 = 0, data: UnsafeRawBufferPointer? = nil) {
        guard let fd else { return }
        var r: [UInt8] = [op.rawValue]
        func le<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { r += $0 } }
        let p = Array(path.utf8)
        le(UInt32(p.count))
        r += p
        le(a)
        le(b)
        le(UInt64(data?.count ?? 0))
        if let data { r += data }
        lock.withLock { _ in
            r.withUnsafeBytes { b in
                var done = 0
                while done < b.count {
                    let n = Glibc.write(fd, b.baseAddress! + done, b.count - done)
                    if n <= 0 { if errno == EINTR { continue }; break }
                    done += n
                }
            }
        }
    }
}
