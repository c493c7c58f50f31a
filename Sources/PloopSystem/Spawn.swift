import CPloopSys
import Glibc

/// Child processes, started with `posix_spawn`. Every child starts with an empty signal mask
/// and the default action for the signals this process blocks, ignores or handles: a mask
/// inherited from a runtime (a blocked SIGCHLD makes a shell's `wait` sleep for ever) or our
/// ignored SIGPIPE must not leak into programs we run. See docs/decisions/0006.
public enum Spawn {
    /// What a child's descriptor is.
    public enum Source: Sendable, Equatable {
        /// /dev/null (read-only for 0, write-only otherwise).
        case null
        /// A file opened for appending, created 0600 if missing, never through a symlink.
        case append(String)
        /// A descriptor of ours.
        case descriptor(Int32)
    }

    /// `posix_spawnattr_setflags`' bits that we use (spawn.h; SETSID is a GNU extension Swift
    /// does not import).
    struct Flags: OptionSet {
        let rawValue: Int16
        static let setSignalDefaults = Flags(rawValue: 0x04)
        static let setSignalMask = Flags(rawValue: 0x08)
        static let newSession = Flags(rawValue: 0x80)
    }

    /// How a child ended.
    public enum Termination: Sendable, Equatable {
        case exited(Int32)
        case signaled(Int32)
        /// The shell's convention: the exit code, or 128 + the signal.
        public var status: Int32 {
            switch self {
            case .exited(let c): c
            case .signaled(let s): 128 + s
            }
        }
    }

    /// Starts `executable` with `arguments` (argv[0] first) and `environment`. `descriptors`
    /// gives the child's descriptors by number, in order; a source of `.descriptor(n)` with n a
    /// lower target repeats it (2 as 1). Descriptors not named are inherited unless close-on-exec.
    /// `directory`: where the child starts (else where we are).
    public static func start(
        _ executable: String, arguments: [String], environment: [String: String],
        descriptors: [(Int32, Source)] = [], newSession: Bool = false, directory: String? = nil
    ) throws(SystemError) -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let directory {
            let r = RawPath.withCString(directory) { cploop_spawn_chdir(&actions, $0) }
            if r != 0 { throw SystemError("posix_spawn_file_actions_addchdir_np", path: directory, errno: r) }
        }
        for (target, source) in descriptors {
            switch source {
            case .null: posix_spawn_file_actions_addopen(&actions, target, "/dev/null", target == 0 ? O_RDONLY : O_WRONLY, 0)
            case .append(let path):
                RawPath.withCString(path) { _ = posix_spawn_file_actions_addopen(&actions, target, $0, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW, 0o600) }
            case .descriptor(let fd): posix_spawn_file_actions_adddup2(&actions, fd, target)
            }
        }
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var flags: Flags = [.setSignalMask, .setSignalDefaults]
        if newSession { flags.insert(.newSession) }
        posix_spawnattr_setflags(&attr, flags.rawValue)
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGPIPE, SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGCHLD] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        let argv = arguments.map { RawPath.withCString($0) { strdup($0) } } + [nil]
        defer { for a in argv { free(a) } }
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for e in envp { free(e) } }
        var pid: pid_t = 0
        let r = RawPath.withCString(executable) { posix_spawn(&pid, $0, &actions, &attr, argv, envp) }
        guard r == 0 else { throw SystemError("posix_spawn", path: executable, errno: r) }
        return pid
    }

    /// Waits for a child of ours to end.
    public static func wait(_ pid: Int32) throws(SystemError) -> Termination {
        var status: Int32 = 0
        _ = try retrying("waitpid", "process \(pid)") { waitpid(pid, &status, 0) }
        return termination(status)
    }

    /// Reaps a child of ours that has ended, without waiting; nil while it runs (or if it is not
    /// our child).
    @discardableResult
    public static func reapIfEnded(_ pid: Int32) -> Termination? {
        var status: Int32 = 0
        return waitpid(pid, &status, WNOHANG) == pid ? termination(status) : nil
    }

    static func termination(_ status: Int32) -> Termination {
        // WIFEXITED / WEXITSTATUS / WTERMSIG, which Swift does not import (macros).
        let signal = status & 0x7f
        return signal == 0 ? .exited((status >> 8) & 0xff) : .signaled(signal)
    }

    /// The environment of this process.
    public static var environment: [String: String] {
        var out: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "=") { out[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            p += 1
        }
        return out
    }

    /// Runs `/bin/sh -c command` with our descriptors and environment and waits: the shell's
    /// status (128 + N for a signal N).
    public static func shell(_ command: String) throws(SystemError) -> Int32 {
        let pid = try start("/bin/sh", arguments: ["sh", "-c", command], environment: environment)
        return try wait(pid).status
    }

    /// What `run` gives back.
    public struct Output: Sendable {
        public var termination: Termination
        public var standardOutput: [UInt8]
        public var standardError: [UInt8]
    }

    /// Runs a program to its end with /dev/null as input, keeping both outputs. Both pipes are
    /// read as the program writes (a chatty program would block on a full pipe otherwise);
    /// `output` hears the standard output as it comes.
    public static func run(
        _ executable: String, arguments: [String], environment: [String: String], directory: String? = nil,
        output: ((ArraySlice<UInt8>) -> Void)? = nil
    ) throws(SystemError) -> Output {
        let readers: [Channel]
        let pid: Int32
        do {
            let out = try Channel.pipe(), err = try Channel.pipe()
            pid = try start(
                executable, arguments: arguments, environment: environment,
                descriptors: [(0, .null), (1, .descriptor(out.write.fd)), (2, .descriptor(err.write.fd))], directory: directory)
            readers = [out.read, err.read]
        }  // our copies of the write ends close here, so the reads end when the program's do
        var kept: [[UInt8]] = [[], []]
        var open = [true, true]
        var chunk = [UInt8](repeating: 0, count: 65536)
        var failure: SystemError?
        while open.contains(true) && failure == nil {
            var fds = (0..<2).map { pollfd(fd: open[$0] ? readers[$0].fd : -1, events: Int16(POLLIN), revents: 0) }
            do { _ = try retrying("poll", executable) { poll(&fds, 2, -1) } } catch {
                failure = error
                break
            }
            for i in 0..<2 where open[i] && fds[i].revents != 0 {
                do {
                    let n = try chunk.withUnsafeMutableBytes { b in Result { () throws(SystemError) in try readers[i].readSome(into: b) } }.get()
                    if n == 0 { open[i] = false; continue }
                    kept[i] += chunk[0..<n]
                    if i == 0 { output?(chunk[0..<n]) }
                } catch { failure = error }
            }
        }
        let ended = try wait(pid)
        if let failure { throw failure }
        return Output(termination: ended, standardOutput: kept[0], standardError: kept[1])
    }
}
