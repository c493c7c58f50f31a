#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A failed system call: which call, on what, and the errno it returned.
public struct SystemError: Error, Sendable, Equatable, Codable, CustomStringConvertible {
    public let call: String
    public let path: String
    public let errno: Int32
    /// Said instead of strerror's words where the errno alone would mislead.
    public let reason: String?

    public init(_ call: String, path: String, errno: Int32, reason: String? = nil) {
        self.call = call
        self.path = path
        self.errno = errno
        self.reason = reason
    }

    public var message: String { reason ?? String(cString: strerror(errno)) }
    public var description: String { "\(call) \(path): \(message)" }
}

/// Runs a call that returns -1 and sets errno, retrying EINTR here and nowhere else.
@inline(__always)
func retrying<T: BinaryInteger>(_ call: String, _ path: String, _ body: () -> T) throws(SystemError) -> T {
    while true {
        let r = body()
        if r >= 0 { return r }
        let e = errno
        if e == EINTR { continue }
        throw SystemError(call, path: path, errno: e)
    }
}
