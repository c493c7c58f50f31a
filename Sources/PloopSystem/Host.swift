import Glibc

/// Facts about this process and the host it runs on.
public enum Host {
    /// Whether the effective user is root.
    public static var isRoot: Bool { geteuid() == 0 }
    /// The real user id.
    public static var userID: UInt32 { getuid() }
    public static var processID: Int32 { getpid() }

    /// Whether this process may read and write `path` (`access(R_OK|W_OK)`).
    public static func canReadWrite(_ path: String) -> Bool { RawPath.withCString(path) { access($0, R_OK | W_OK) } == 0 }

    /// Whether a process `pid` exists (`kill(pid, 0)`; EPERM means it exists as another user's).
    public static func processExists(_ pid: Int32) -> Bool { pid > 0 && (kill(pid, 0) == 0 || errno == EPERM) }

    /// Whether the descriptor is a terminal.
    public static func isTerminal(_ fd: Int32) -> Bool { isatty(fd) != 0 }

    /// A process's command name (`/proc/PID/comm`), or nil when it is gone.
    public static func command(of pid: Int32) -> String? {
        guard let f = try? File(path: "/proc/\(pid)/comm", mode: .readOnly) else { return nil }
        var bytes = [UInt8](repeating: 0, count: 64)
        let n = bytes.withUnsafeMutableBytes { (try? f.read(into: $0, at: 0)) ?? 0 }
        return String(decoding: bytes[0..<n].prefix { $0 != UInt8(ascii: "\n") }, as: UTF8.self)
    }

    /// Sleeps the calling thread (for the short waits of polling loops).
    public static func pause(milliseconds: Int) { usleep(UInt32(milliseconds) * 1000) }

    /// A monotonic clock, in nanoseconds.
    public static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Ends the process at once, as a kill would: no atexit handlers, no buffers flushed (the
    /// crash hooks of tests).
    public static func exitImmediately(_ status: Int32) -> Never { _exit(status) }
}
