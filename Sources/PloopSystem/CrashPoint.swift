import Glibc
import Synchronization

/// A test hook for crash tests of whole commands: with `PLOOP_TEST_CRASH_AT=N` in the
/// environment, the process ends at once (`_exit(137)`, as if killed: no cleanup, no signal
/// handlers) just before its Nth change to a file (write, sync, truncate, fallocate, rename,
/// unlink). Everything before it happened; nothing after. Unset, it costs one load per call.
public enum CrashPoint {
    /// The environment variable; processes a command starts for good (device daemons) do not get it.
    public static let variable = "PLOOP_TEST_CRASH_AT"
    private static let limit: Int? = {
        guard let v = getenv(variable) else { return nil }
        return Int(String(cString: v))
    }()
    private static let count = Atomic<Int>(0)

    @inline(__always)
    public static func step() {
        guard let limit else { return }
        if count.add(1, ordering: .relaxed).newValue >= limit { _exit(137) }
    }
}
