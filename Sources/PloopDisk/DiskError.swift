import PloopDevice
import PloopImage

/// Why a disk (a folder with DiskDescriptor.xml) operation was refused or failed. Each message
/// names the file or element and says what to do.
public enum DiskError: Error, Sendable, Equatable, CustomStringConvertible {
    case noDescriptor(String)
    case unreadable(String, String)
    case malformed(String, String)
    case invalid(String, element: String, String)
    case unknownGUID(String, GUID)
    case badGUID(String)
    case guidExists(String, GUID)
    case alreadyExists(String)
    case locked(String, holder: Int32?)
    case image(ImageError)
    case mounted(String, device: String)
    case notMounted(String)
    case refused(String)
    case io(String)
    /// A device operation of an online command failed.
    case device(String, DeviceError)
    /// A journalled operation failed part way (`cause`) while doing `step`; `left` says what
    /// state it left the disk in.
    indirect case stopped(String, operation: String, step: String, cause: DiskError, left: Left)

    public enum Left: Sendable, Equatable {
        /// Undone at once: the disk is as it was.
        case undone
        /// Its journal stays: the disk reads as before it, and the next command finishes or undoes it.
        case pending
    }

    /// The error behind a `stopped` one (itself for the others).
    public var cause: DiskError {
        if case .stopped(_, _, _, let c, _) = self { return c.cause }
        return self
    }

    public var description: String {
        switch self {
        case .noDescriptor(let p): "\(p): no DiskDescriptor.xml there (give the disk's folder or its DiskDescriptor.xml)"
        case .unreadable(let p, let why): "\(p) cannot be read: \(why)"
        case .malformed(let p, let why): "\(p) is not a valid descriptor: \(why); restore it from a backup, or rebuild it with 'ploop restore-descriptor'"
        case .invalid(let p, let element, let why):
            "\(p): <\(element)> \(why); fix the descriptor (or rebuild it with 'ploop restore-descriptor') before using the disk"
        case .unknownGUID(let p, let g): "\(p) has no snapshot \(g) (see 'ploop snapshot-list \(p)')"
        case .badGUID(let s): "\(s) is not a GUID: give one like {5fbaabe3-6958-40ff-92a7-860e329aab41} (braces optional)"
        case .guidExists(let p, let g): "\(p) already has a snapshot \(g): choose another GUID"
        case .alreadyExists(let p): "\(p) already exists: this folder holds a disk already"
        case .locked(let p, let holder):
            "\(p) is locked by " + (holder.map { "process \($0)" } ?? "another process") + ": wait for it to finish, or stop it"
        case .image(let e): e.description
        case .mounted(let p, let d): "the disk \(p) is running on \(d): unmount it first ('ploop umount \(p)')"
        case .notMounted(let p): "the disk \(p) is not running on any device"
        case .refused(let s): s
        case .io(let s): s
        // Most device errors start with the device's name already (not running, in use, held
        // open …): it is not said twice.
        case .device(let d, let e): "\(e)".hasPrefix(d) ? "\(e)" : "\(d): \(e)"
        case .stopped(let p, let op, let step, let cause, .undone):
            "\(op) failed while \(step): \(cause). Nothing was changed: \(p) is as it was"
        case .stopped(let p, let op, let step, let cause, .pending):
            "\(op) failed while \(step): \(cause). The disk still reads as before it; its journal (\(p).journal) stays, and the next command on the disk finishes the \(op.split(separator: " ").first ?? "") or undoes it (once the cause is fixed: free space, replace the failing disk; 'ploop check -r \(p)' only looks)"
        }
    }
}

/// Runs a closure whose only errors are `ImageError`s, as `DiskError.image`.
func imageErrors<T>(_ body: () throws(ImageError) -> T) throws(DiskError) -> T {
    do { return try body() } catch { throw .image(error) }
}
