import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A stream descriptor: a pipe end, a socket, or a descriptor handed to us on the command line
/// (`copy -i/-f`). Reads and writes are sequential, EINTR retried by swift-system. A channel made
/// with `owning: true` closes the descriptor when it goes away.
public final class Channel: Sendable {
    public let descriptor: FileDescriptor
    /// What the descriptor is, for messages ("descriptor 5", "the control socket of /dev/ploop3").
    public let name: String
    let owning: Bool

    public init(_ fd: Int32, name: String? = nil, owning: Bool) {
        descriptor = FileDescriptor(rawValue: fd)
        self.name = name ?? "descriptor \(fd)"
        self.owning = owning
    }

    deinit { if owning { try? descriptor.close() } }

    public var fd: Int32 { descriptor.rawValue }

    /// Whether `fd` is an open descriptor of this process (`fcntl(F_GETFD)`).
    public static func isOpen(_ fd: Int32) -> Bool { fd >= 0 && fcntl(fd, F_GETFD) >= 0 }

    /// One `read(2)`: the bytes it gave (0 at the end of the stream).
    public func readSome(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int {
        try lifting("read", name) { try descriptor.read(into: buffer) }
    }

    /// Fills `buffer`; false if the stream ended first.
    public func readFull(_ buffer: inout [UInt8]) throws(SystemError) -> Bool {
        var done = 0
        while done < buffer.count {
            let n = try buffer.withUnsafeMutableBytes { b in
                Result { () throws(SystemError) in try readSome(into: UnsafeMutableRawBufferPointer(rebasing: b[done...])) }
            }.get()
            if n == 0 { return false }
            done += n
        }
        return true
    }

    /// Writes all of `bytes` (a broken pipe is EPIPE here, never SIGPIPE, once
    /// `Signals.ignoreBrokenPipe()` ran).
    public func writeAll(_ bytes: UnsafeRawBufferPointer) throws(SystemError) {
        _ = try lifting("write", name) { try descriptor.writeAll(bytes) }
    }

    public func writeAll(_ bytes: [UInt8]) throws(SystemError) {
        try bytes.withUnsafeBytes { b in Result { () throws(SystemError) in try writeAll(b) } }.get()
    }

    /// A new pipe: (read end, write end), both close-on-exec and owned.
    public static func pipe() throws(SystemError) -> (read: Channel, write: Channel) {
        let (r, w) = try lifting("pipe", "") { try FileDescriptor.pipe() }
        _ = fcntl(r.rawValue, F_SETFD, FD_CLOEXEC)
        _ = fcntl(w.rawValue, F_SETFD, FD_CLOEXEC)
        return (Channel(r.rawValue, name: "pipe", owning: true), Channel(w.rawValue, name: "pipe", owning: true))
    }
}
