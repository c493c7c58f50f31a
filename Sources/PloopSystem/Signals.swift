import CPloopSys
import Glibc

/// The signal dispositions and masks the tool sets, named.
public enum Signals {
    /// SIGPIPE ignored: a write to a pipe or socket nobody reads fails with EPIPE, which the
    /// caller reports, instead of killing the process silently.
    public static func ignoreBrokenPipe() { signal(SIGPIPE, SIG_IGN) }

    /// Blocks SIGTERM and SIGINT in the calling thread and the threads it starts afterwards, so
    /// that one thread takes them with `waitForTermination` (a daemon's orderly shutdown).
    public static func blockTermination() {
        var set = terminationSet()
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// Waits until SIGTERM or SIGINT arrives (blocked with `blockTermination` first); the signal.
    public static func waitForTermination() -> Int32 {
        var set = terminationSet()
        var sig: Int32 = 0
        while sigwait(&set, &sig) != 0 {}
        return sig
    }

    static func terminationSet() -> sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGTERM)
        sigaddset(&set, SIGINT)
        return set
    }

    /// Closes every descriptor from `first` up (a daemon must not keep its starter's pipes).
    public static func closeDescriptors(from first: Int32) { cploop_close_from(first) }
}
