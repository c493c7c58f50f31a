import CPloopSys
import PloopDevice

/// The kernel's ioctl request numbers, as the C shim builds them with the kernel's macros.
public enum KernelIoctl: Int32, CaseIterable, Sendable, CustomStringConvertible {
    case addDelta = 0, clear, stop, start, snapshot, delDelta, trackInit, trackStop, trackAbort, trackSetPos
    case trackRead, sync, merge, replaceDelta, truncate, `internal`, updateIndex, grow, fbGet, balloon
    case freeBlocks, relocBlocks, getDevice, discardInit, discardFini, discardWait, fbDrop, fbFilter
    case maxDeltaSize, pushBackupInit, pushBackupIO, pushBackupStop, freeze, thaw

    public var request: UInt { UInt(cploop_ioctl_number(rawValue)) }

    /// The ioctl whose request number this is.
    public init?(request: UInt) {
        guard let c = Self.allCases.first(where: { $0.request == request }) else { return nil }
        self = c
    }

    /// The kernel's name, for messages: `PLOOP_IOC_ADD_DELTA`.
    public var description: String {
        let names = [
            "ADD_DELTA", "CLEAR", "STOP", "START", "SNAPSHOT", "DEL_DELTA", "TRACK_INIT", "TRACK_STOP", "TRACK_ABORT",
            "TRACK_SETPOS", "TRACK_READ", "SYNC", "MERGE", "REPLACE_DELTA", "TRUNCATE", "INTERNAL", "UPDATE_INDEX",
            "GROW", "FBGET", "BALLOON", "FREEBLKS", "RELOCBLKS", "GETDEVICE", "DISCARD_INIT", "DISCARD_FINI",
            "DISCARD_WAIT", "FBDROP", "FBFILTER", "MAX_DELTA_SIZE", "PUSH_BACKUP_INIT", "PUSH_BACKUP_IO",
            "PUSH_BACKUP_STOP", "FREEZE", "THAW",
        ]
        return "PLOOP_IOC_" + names[Int(rawValue)]
    }
}

/// Constants of the ABI (`ploop_if.h`).
public enum KernelABI {
    public static let formatRaw: UInt32 = 1
    public static let formatPloop1: UInt32 = 2
    public static let flagReadOnly: UInt32 = 1
    public static let flagCookie: UInt32 = 4
    public static let flagClusterBlocks: UInt32 = 8
    public static let flagFSSync: UInt32 = 0x1000_0000
    public static let ioAuto: UInt32 = 0
    public static let cookieSize = 64
}

/// Argument memory of one ioctl: a fixed C structure with a tail of C structures right after it
/// (chunks, extents, maps), copied in before the call and back out after it.
enum IoctlArgument {
    @discardableResult
    static func with<Fixed, Tail, R>(
        _ fixed: inout Fixed, tail: inout [Tail], _ body: (UnsafeMutableRawPointer) throws(DeviceError) -> R
    ) throws(DeviceError) -> R {
        let fixedSize = MemoryLayout<Fixed>.stride
        let total = fixedSize + tail.count * MemoryLayout<Tail>.stride
        let memory = UnsafeMutableRawPointer.allocate(byteCount: max(total, 8), alignment: 8)
        defer { memory.deallocate() }
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: max(total, 8))
        withUnsafeBytes(of: &fixed) { memory.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        tail.withUnsafeBytes { if let b = $0.baseAddress { memory.advanced(by: fixedSize).copyMemory(from: b, byteCount: $0.count) } }
        let result = try body(memory)
        fixed = memory.load(as: Fixed.self)
        for i in tail.indices {
            tail[i] = memory.load(fromByteOffset: fixedSize + i * MemoryLayout<Tail>.stride, as: Tail.self)
        }
        return result
    }

    @discardableResult
    static func with<Fixed, R>(_ fixed: inout Fixed, _ body: (UnsafeMutableRawPointer) throws(DeviceError) -> R) throws(DeviceError) -> R {
        var none: [UInt8] = []
        return try with(&fixed, tail: &none, body)
    }
}
