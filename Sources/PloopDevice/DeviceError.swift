import PloopImage

/// Errors of devices and their backends. The cases follow the errno values of the kernel ABI so a
/// kernel backend can map each ioctl failure to one of them, and messages say what to do.
public enum DeviceError: Error, Sendable, Equatable, Codable, CustomStringConvertible {
    /// EBUSY: another maintenance is running.
    case busy(MaintenanceState)
    /// EINVAL: the request does not fit the device's state or geometry.
    case invalid(String)
    /// EAGAIN: nothing to report now (TRACK_READ).
    case again
    /// ECONNABORTED: tracking was aborted.
    case aborted
    /// EBUSY on TRACK_STOP: dirty extents remain unread.
    case unreadExtents
    /// EOPNOTSUPP.
    case notSupported(String)
    case noSuchDevice(String)
    case deviceInUse(String)
    case notRunning(String)
    case readOnly(String)
    case outOfRange(offset: UInt64, length: Int, size: UInt64)
    case image(ImageError)
    /// A system call of a backend failed (errno).
    case system(String, errno: Int32)
    /// A backend cannot be used here (no module, no FUSE, not root …).
    case unavailable(String)

    public var description: String {
        switch self {
        case .busy(let s):
            switch s {
            case .fbloaded, .reloc: "device is busy: an interrupted balloon operation (\(s)) is pending; run 'ploop balloon complete'"
            case .balloon: "device is busy: a stale BALLOON state is set; run 'ploop balloon clear' if no balloon operation runs"
            default: "device is busy: another maintenance operation (\(s)) is in progress"
            }
        case .invalid(let s): s
        case .again: "nothing to report yet (try again)"
        case .aborted: "dirty tracking was aborted"
        case .unreadExtents: "dirty extents remain unread: read them all before stopping tracking"
        case .notSupported(let s): "not supported: \(s)"
        case .noSuchDevice(let d): "\(d): no such ploop device (see 'ploop list')"
        case .deviceInUse(let d): "\(d) is already in use"
        case .notRunning(let d): "\(d) is not running"
        case .readOnly(let d): "\(d) is read-only"
        case .outOfRange(let o, let l, let s): "I/O of \(l) bytes at \(o) is beyond the device size \(s)"
        case .image(let e): e.description
        case .system(let what, let e): "\(what): \(String(cString: strerror(e)))"
        case .unavailable(let s): s
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif

/// Lifts an image error into a device error.
@inline(__always)
public func lifting<T>(_ body: () throws(ImageError) -> T) throws(DeviceError) -> T {
    do { return try body() } catch { throw .image(error) }
}
