import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A failed system call: which call, on what, and the errno it returned.
public struct SystemError: Error, Sendable, Equatable, Codable, CustomStringConvertible {
    public let call: String
    public let path: String
    /// The raw value, as it crosses the control socket and is mapped to exit codes.
    public let errno: Int32
    /// Said instead of strerror's words where the errno alone would mislead.
    public let reason: String?

    public init(_ call: String, path: String, errno: Int32, reason: String? = nil) {
        self.call = call
        self.path = path
        self.errno = errno
        self.reason = reason
    }

    public init(_ call: String, path: String, _ code: Errno, reason: String? = nil) {
        self.init(call, path: path, errno: code.rawValue, reason: reason)
    }

    /// The errno as swift-system names it (`.resourceBusy`, `.fileExists`, …).
    public var code: Errno { Errno(rawValue: errno) }

    public var message: String { reason ?? Self.words(errno) }

    /// strerror's words for an errno ("Device or resource busy").
    public static func words(_ errno: Int32) -> String { String(cString: strerror(errno)) }
    public var description: String { "\(call) \(path): \(message)" }
}

/// Runs a call that returns -1 and sets errno, retrying EINTR. With swift-system's own
/// `retryOnInterrupt` this is the one place EINTR is handled.
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

/// Runs a C shim of CPloopSys (which returns `-errno`), retrying EINTR; returns its value.
@inline(__always)
@discardableResult
func shim<T: SignedInteger>(_ call: String, _ path: String, _ body: () -> T) throws(SystemError) -> T {
    while true {
        let r = body()
        if r >= 0 { return r }
        if r == T(-EINTR) { continue }
        throw SystemError(call, path: path, errno: Int32(truncatingIfNeeded: 0 - r))
    }
}

/// Runs a swift-system call (which throws `Errno` and retries EINTR itself) and names it.
@inline(__always)
func lifting<T>(_ call: String, _ path: String, _ body: () throws -> T) throws(SystemError) -> T {
    do { return try body() } catch let e as Errno { throw SystemError(call, path: path, e) } catch {
        throw SystemError(call, path: path, errno: EIO, reason: "\(error)")
    }
}
