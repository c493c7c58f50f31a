import PloopSystem
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
    /// EBUSY on STOP: processes have the device (or a partition) open; by "PID (command)".
    case heldOpen(String, by: [String])
    case notRunning(String)
    case readOnly(String)
    case outOfRange(offset: UInt64, length: Int, size: UInt64)
    case image(ImageError)
    /// A system call of a backend failed (errno).
    case system(String, errno: Int32)
    /// A backend cannot be used here (no module, no FUSE, not root …).
    case unavailable(String)

    // The refusals every backend gives for the same request, whatever carries it (the model, a
    // daemon, the kernel's ioctls): one case each, so callers and tests match the case and the
    // words are written once, here.

    /// A merge range that does not fit the stack 0...top (or names one level).
    case levelsOutOfRange(ClosedRange<Int>, top: Int)
    /// An operation that works on the top delta only was given another level.
    case notTopLevel(DeviceOperation, level: Int, top: Int)
    /// A level that cannot take part (not a read-only ploop1 level, the base of a raw stack …).
    case unsuitableLevel(DeviceOperation, level: Int)
    /// An operation that needs another maintenance state.
    case wrongState(DeviceOperation, MaintenanceState)
    /// A device is never made smaller.
    case cannotShrink(fromSectors: UInt64, toSectors: UInt64)
    /// A size beyond what ploop (or the image format) can address.
    case sizeTooLarge(sectors: UInt64, limit: UInt64)
    /// A size that is not a whole number of clusters where one must be.
    case notClusterMultiple(bytes: UInt64, clusterBytes: Int)
    case invalidClusterSize(sectors: UInt32)
    /// A mount request without images.
    case noImages
    /// A name that is not `/dev/ploopN`.
    case badDeviceName(String)
    /// Flags that exclude each other in one request.
    case conflictingFlags(String)
    /// A control message that is not a request of this version (the simulator's socket).
    case protocolMismatch(String)

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
        case .heldOpen(let d, let by):
            "\(d) is held open by \(by.isEmpty ? "another process" : by.joined(separator: ", ")): close what uses it, then unmount again"
        case .notRunning(let d): "\(d) is not running"
        case .readOnly(let d): "\(d) is read-only"
        case .outOfRange(let o, let l, let s): "I/O of \(l) bytes at \(o) is beyond the device size \(s)"
        case .image(let e): e.description
        case .system(let what, let e): "\(what): \(SystemError.words(e))"
        case .unavailable(let s): s
        case .levelsOutOfRange(let r, let top):
            "levels \(r.lowerBound)..\(r.upperBound) do not fit the stack 0..\(top): give L1..L2 with L1 < L2 <= \(top)"
        case .notTopLevel(let op, let l, let top): "\(op) works on the top delta (level \(top)), not level \(l)"
        case .unsuitableLevel(let op, let l): "level \(l) cannot be used for \(op): \(op.levelRule)"
        case .wrongState(let op, let st): "\(op) \(op.stateRule) (the device is in state \(st))"
        case .cannotShrink(let from, let to):
            "cannot shrink the device from \(from) to \(to) sectors: ploop only grows (inflate a balloon to give space back)"
        case .sizeTooLarge(let s, let limit): "\(s) sectors is beyond the largest device ploop supports (\(limit) sectors)"
        case .notClusterMultiple(let b, let c):
            "the size \(b) bytes is not a whole number of clusters of \(c) bytes: grow the device to a whole cluster first"
        case .invalidClusterSize(let c): "cluster size \(c) sectors is not a power of two from 64 to 131072"
        case .noImages: "no images to mount"
        case .badDeviceName(let d): "\(d) is not a ploop device name (/dev/ploopN, or /dev/mapper/ploopN on dm-ploop)"
        case .conflictingFlags(let s): s
        case .protocolMismatch(let s): s
        }
    }
}

/// The device operations refusals name.
public enum DeviceOperation: String, Sendable, Codable, CustomStringConvertible {
    case merge, snapshot, grow, deleteDelta = "delete-delta", updateIndex = "index update"
    case loadFreeBlocks = "loading free blocks", freeBlockList = "the free block list", relocateBlocks = "relocation"
    case tracking = "dirty tracking"

    public var description: String { rawValue }

    /// What a level must be for the operation.
    var levelRule: String {
        switch self {
        case .deleteDelta: "only read-only ploop1 levels above the base and below the top leave a running stack"
        case .updateIndex: "the level must be a read-only ploop1 level of the stack"
        default: "it must be a ploop1 level"
        }
    }

    /// Which state the operation needs.
    var stateRule: String {
        switch self {
        case .loadFreeBlocks: "needs the BALLOON state (enter it first)"
        case .relocateBlocks, .freeBlockList: "needs loaded free blocks (state FBLOADED or RELOC)"
        case .tracking: "needs dirty tracking to be running"
        default: "cannot run in this state"
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
