import CPloopSys
import Glibc

/// Unix stream sockets of the control protocol, and who is at the other end.
public enum UnixSocket {
    /// A listening socket at `path` (an old one there is removed), mode 0600.
    public static func listen(_ path: String) throws(SystemError) -> Channel {
        let fd = try shim("listen", path) { RawPath.withCString(path) { cploop_unix_listen($0) } }
        return Channel(fd, name: path, owning: true)
    }

    /// A socket connected to the listener at `path`.
    public static func connect(_ path: String) throws(SystemError) -> Channel {
        let fd = try shim("connect", path) { RawPath.withCString(path) { cploop_unix_connect($0) } }
        return Channel(fd, name: path, owning: true)
    }

    /// The next connection of a listening socket (EINTR retried).
    public static func accept(_ listener: Channel) throws(SystemError) -> Channel {
        let fd = try retrying("accept", listener.name) { Glibc.accept(listener.fd, nil, nil) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return Channel(fd, name: listener.name, owning: true)
    }

    /// SO_PEERCRED: the user and process at the other end of a connected socket.
    public static func peer(_ connection: Channel) throws(SystemError) -> (uid: UInt32, pid: Int32) {
        var uid: UInt32 = 0
        var pid: Int32 = 0
        try shim("SO_PEERCRED", connection.name) { cploop_peer_credentials(connection.fd, &uid, &pid) }
        return (uid, pid)
    }
}
