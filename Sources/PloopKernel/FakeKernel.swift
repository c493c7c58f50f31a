import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopSystem
import Synchronization

/// A stand-in for the kernel driver behind `KernelBackend`'s transport, for hosts without the
/// module. It decodes each request from its number and its argument bytes, at the offsets the
/// kernel's header gives (not through our C structures, so a layout slip on either side shows),
/// performs it on a lower backend (a `DeviceModel` in this process, or the simulator's devices),
/// writes the answer back into the argument as the kernel does, and keeps a sysfs tree of the
/// kernel's layout under `sysfsRoot`.
///
/// Where it differs from the driver: deltas given by ADD_DELTA are opened by path (from their
/// descriptors) when START builds the stack, so the in-use mark is set at START rather than at
/// ADD_DELTA; SNAPSHOT checks the empty delta user space made, then lets the lower backend make
/// its own in its place; FREEZE/THAW, discard, push-backup, TRUNCATE and MAX_DELTA_SIZE answer
/// ENOTTY, as a driver without them would.
public final class FakeKernel: KernelTransport {
    public let sysfsRoot: String
    public let lower: any DeviceBackend
    private let pending = Mutex<[Int: [PendingDelta]]>([:])
    /// Every request decoded, in order (tests read it).
    public let requests = Mutex<[KernelIoctl]>([])

    struct PendingDelta {
        var path: String
        var raw: Bool
        var readOnly: Bool
        var clusterLog: UInt32
        var version: FormatVersion?
        var cookie: String?
    }

    public init(lower: any DeviceBackend, sysfsRoot: String) {
        self.lower = lower
        self.sysfsRoot = sysfsRoot
    }

    public func openIO(device index: Int) throws(DeviceError) -> any DeviceIO {
        try lower.openIO(DeviceName.name(index))
    }

    public func ioctl(device n: Int, request: UInt, argument: UnsafeMutableRawPointer?) throws(DeviceError) -> Int32 {
        guard let op = KernelIoctl(request: request) else { return -ENOTTY }
        requests.withLock { $0.append(op) }
        do {
            return try perform(n, op, Bytes(argument))
        } catch {
            return -Self.errno(error)
        }
    }

    /// The errno the driver returns where the model throws.
    static func errno(_ e: DeviceError) -> Int32 {
        switch e {
        case .busy, .unreadExtents, .deviceInUse, .heldOpen: EBUSY
        case .invalid, .notRunning, .outOfRange, .noSuchDevice: EINVAL
        case .levelsOutOfRange, .notTopLevel, .unsuitableLevel, .wrongState, .cannotShrink, .notClusterMultiple, .invalidClusterSize,
            .noImages, .badDeviceName, .conflictingFlags, .protocolMismatch:
            EINVAL
        case .sizeTooLarge: EFBIG
        case .again: EAGAIN
        case .aborted: ECONNABORTED
        case .notSupported: EOPNOTSUPP
        case .readOnly: EROFS
        case .image(.inUse), .image(.locked): EBUSY
        case .image(.io(let s)): s.errno
        case .image(.fileTooLarge): EFBIG
        case .image: EINVAL
        case .system(_, let n): n
        case .unavailable: ENODEV
        }
    }

    /// Argument memory read and written at the kernel header's byte offsets.
    struct Bytes {
        let p: UnsafeMutableRawPointer?
        init(_ p: UnsafeMutableRawPointer?) { self.p = p }
        func need() throws(DeviceError) -> UnsafeMutableRawPointer {
            guard let p else { throw .system("argument", errno: EFAULT) }
            return p
        }
        func u8(_ o: Int) throws(DeviceError) -> UInt8 { try need().load(fromByteOffset: o, as: UInt8.self) }
        func u16(_ o: Int) throws(DeviceError) -> UInt16 { try need().loadUnaligned(fromByteOffset: o, as: UInt16.self) }
        func u32(_ o: Int) throws(DeviceError) -> UInt32 { try need().loadUnaligned(fromByteOffset: o, as: UInt32.self) }
        func s32(_ o: Int) throws(DeviceError) -> Int32 { try need().loadUnaligned(fromByteOffset: o, as: Int32.self) }
        func u64(_ o: Int) throws(DeviceError) -> UInt64 { try need().loadUnaligned(fromByteOffset: o, as: UInt64.self) }
        func put(_ v: UInt32, _ o: Int) throws(DeviceError) { try need().storeBytes(of: v, toByteOffset: o, as: UInt32.self) }
        func put(_ v: UInt64, _ o: Int) throws(DeviceError) { try need().storeBytes(of: v, toByteOffset: o, as: UInt64.self) }
        func put(_ v: UInt8, _ o: Int) throws(DeviceError) { try need().storeBytes(of: v, toByteOffset: o, as: UInt8.self) }
        func string(_ o: Int, max: Int) throws(DeviceError) -> String {
            let base = try need().advanced(by: o).assumingMemoryBound(to: UInt8.self)
            let bytes = (0..<max).map { base[$0] }.prefix { $0 != 0 }
            return String(decoding: bytes, as: UTF8.self)
        }
    }

    func running(_ n: Int) -> DeviceInfo? { try? lower.info(DeviceName.name(n)) }

    /// One ioctl, routed by kind to the functions below (each decodes its argument at the kernel
    /// header's offsets and drives the lower backend).
    func perform(_ n: Int, _ op: KernelIoctl, _ a: Bytes) throws(DeviceError) -> Int32 {
        switch op {
        case .getDevice, .addDelta, .start, .stop, .clear, .delDelta, .snapshot:
            try stackRequest(n, op, a)
        case .merge, .grow, .sync, .updateIndex:
            try maintenanceRequest(n, op, a)
        case .balloon, .freeBlocks, .fbGet, .fbFilter, .fbDrop, .relocBlocks:
            try balloonRequest(n, op, a)
        case .trackInit, .trackSetPos, .trackRead, .trackStop, .trackAbort:
            try trackingRequest(n, op, a)
        case .replaceDelta, .truncate, .internal, .discardInit, .discardFini, .discardWait, .maxDeltaSize,
            .pushBackupInit, .pushBackupIO, .pushBackupStop, .freeze, .thaw:
            -ENOTTY
        }
    }

    /// Building, starting, stopping and changing the delta stack.
    private func stackRequest(_ n: Int, _ op: KernelIoctl, _ a: Bytes) throws(DeviceError) -> Int32 {
        let dev = DeviceName.name(n)
        switch op {
        case .getDevice:
            let taken = Set(KernelDeviceState.indexes(sysfs: sysfsRoot)).union(pending.withLock { Set($0.keys) })
            let free = (0...).first { !taken.contains($0) && running($0) == nil }!
            try a.put(UInt32(free << 4), 0)
        case .addDelta:
            try addDelta(n, a)
        case .start:
            try start(n)
        case .stop:
            guard running(n) != nil else { throw .notRunning(dev) }
            try lower.umount(dev)
            write(n, "pstate/running", "0")
        case .clear:
            if running(n) != nil { throw .busy(.off) }
            _ = pending.withLock { $0.removeValue(forKey: n) }
            try? FileManager.default.removeItem(atPath: directory(n))
            // Leave no empty tree behind.
            Folder.removeEmpty(sysfsRoot + "/block")
            Folder.removeEmpty(sysfsRoot)
        case .delDelta:
            let level = Int(try a.u32(0))
            if running(n) != nil {
                try lower.deleteDelta(dev, level: level)
                publish(n)
            } else {
                try deleteStopped(n, level)
            }
        case .snapshot:
            try snapshot(n, a)
        default:
            preconditionFailure("\(op) is routed elsewhere by perform")
        }
        return 0
    }

    /// Merge, grow, sync and index updates of a running device.
    private func maintenanceRequest(_ n: Int, _ op: KernelIoctl, _ a: Bytes) throws(DeviceError) -> Int32 {
        let dev = DeviceName.name(n)
        switch op {
        case .merge:
            guard let info = running(n) else { throw .notRunning(dev) }
            let top = info.levels.count - 1
            guard top >= 1 else { throw .invalid("one level: nothing to merge") }
            _ = try lower.merge(dev, levels: top - 1...top, progress: nil)
            publish(n)
        case .grow:
            guard let info = running(n) else { throw .notRunning(dev) }
            let flags = try a.u32(4)
            let log = try a.u32(8)
            guard 1 << log == info.clusterBytes / 512 else { throw .invalid("cluster_log \(log) is not the device's") }
            let size = UInt64(try a.u32(12))
            try lower.grow(dev, sizeSectors: flags & KernelABI.flagClusterBlocks != 0 ? size << log : size)
            publish(n)
        case .sync:
            try lower.sync(dev)
        case .updateIndex:
            let count = Int(try a.u32(0))
            let level = Int(try a.u8(4))
            var maps: [IndexMap] = []
            for i in 0..<count { maps.append(IndexMap(cluster: try a.u32(8 + 8 * i), block: try a.u32(12 + 8 * i))) }
            try lower.updateIndex(dev, level: level, maps: maps)
        default:
            preconditionFailure("\(op) is routed elsewhere by perform")
        }
        return 0
    }

    /// The balloon, free-block and relocation requests.
    private func balloonRequest(_ n: Int, _ op: KernelIoctl, _ a: Bytes) throws(DeviceError) -> Int32 {
        let dev = DeviceName.name(n)
        switch op {
        case .balloon:
            do {
                let r = try lower.balloon(dev, inflate: try a.u8(9) != 0, keepIntact: try a.u8(10) != 0)
                try a.put(r.state.rawValue, 0)
                try a.put(r.allocHead, 4)
                try a.put(UInt8(truncatingIfNeeded: r.level), 8)
            } catch {
                // The driver reports the current state even when it refuses.
                if let s = try? lower.balloon(dev, inflate: false, keepIntact: true) { try a.put(s.state.rawValue, 0) }
                throw error
            }
        case .freeBlocks:
            let count = Int(try a.u32(0))
            let level = Int(try a.u8(8))
            var extents: [FreeExtent] = []
            for i in 0..<count {
                let o = 16 + 16 * i
                extents.append(FreeExtent(cluster: try a.u32(o), block: try a.u32(o + 4), length: try a.u32(o + 8)))
            }
            try a.put(try lower.loadFreeBlocks(dev, level: level, extents: extents), 4)
        case .fbGet:
            let capacity = Int(try a.u32(0))
            let list = try lower.freeBlockList(dev)
            for (i, e) in list.prefix(capacity).enumerated() {
                let o = 16 + 16 * i
                try a.put(e.cluster, o)
                try a.put(e.block, o + 4)
                try a.put(e.length, o + 8)
            }
            try a.put(UInt32(list.count), 0)
        case .fbFilter:
            // The minimum length is the argument's value, not memory.
            let minLength = UInt32(truncatingIfNeeded: UInt(bitPattern: a.p))
            try lower.filterFreeBlocks(dev, minLength: minLength)
            return Int32(clamping: try lower.freeBlockList(dev).count)
        case .fbDrop:
            try lower.dropFreeBlocks(dev)
        case .relocBlocks:
            let count = Int(try a.u32(0))
            let head = try a.u32(8)
            let level = Int(try a.u8(12))
            var extents: [RelocExtent] = []
            for i in 0..<count {
                let o = 16 + 16 * i
                extents.append(RelocExtent(cluster: try a.u32(o), block: try a.u32(o + 4), length: try a.u32(o + 8), free: try a.u32(o + 12) != 0))
            }
            try a.put(try lower.relocateBlocks(dev, level: level, allocHead: head, extents: extents), 8)
        default:
            preconditionFailure("\(op) is routed elsewhere by perform")
        }
        return 0
    }

    /// Dirty tracking.
    private func trackingRequest(_ n: Int, _ op: KernelIoctl, _ a: Bytes) throws(DeviceError) -> Int32 {
        let dev = DeviceName.name(n)
        switch op {
        case .trackInit:
            let end = try lower.trackInit(dev)
            try a.put(UInt64(0), 0)
            try a.put(end, 8)
        case .trackSetPos:
            try lower.trackSetPosition(dev, try a.u64(0))
        case .trackRead:
            guard let r = try lower.trackRead(dev) else { throw .again }
            try a.put(r.lowerBound, 0)
            try a.put(r.upperBound, 8)
        case .trackStop:
            try lower.trackStop(dev)
        case .trackAbort:
            try lower.trackAbort(dev)
        default:
            preconditionFailure("\(op) is routed elsewhere by perform")
        }
        return 0
    }

    // MARK: - Building a device

    /// The file behind a descriptor user space passed, as the kernel names it in sysfs.
    static func path(of fd: Int32) throws(DeviceError) -> String {
        guard fd >= 0, let p = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)") else {
            throw .system("delta descriptor \(fd)", errno: EBADF)
        }
        return p
    }

    /// The header the kernel reads through the descriptor (nil for a file without the signature).
    static func header(of fd: Int32) throws(DeviceError) -> ImageHeader? {
        var bytes = [UInt8](repeating: 0, count: PloopSpec.headerSize)
        let n = bytes.withUnsafeMutableBytes { b in try? File(borrowing: fd, path: "delta descriptor \(fd)").read(into: b, at: 0) }
        guard n == bytes.count, ImageHeader.hasSignature(bytes) else { return nil }
        return try? ImageHeader.decode(bytes)
    }

    func addDelta(_ n: Int, _ a: Bytes) throws(DeviceError) {
        if running(n) != nil { throw .deviceInUse(DeviceName.name(n)) }
        let format = try a.u32(0)
        let flags = try a.u32(4)
        let log = try a.u32(8)
        guard try a.u16(16) == 1 else { throw .invalid("one chunk per delta") }
        let fd = try a.s32(24)
        let path = try Self.path(of: fd)
        let cookie = flags & KernelABI.flagCookie != 0 ? try a.string(56, max: KernelABI.cookieSize) : nil
        let stack = pending.withLock { $0[n] ?? [] }
        if let below = stack.last, !below.readOnly { throw .invalid("only the top delta may be writable") }
        if let first = stack.first, first.clusterLog != log { throw .invalid("cluster_log differs from the levels below") }
        var delta = PendingDelta(path: path, raw: false, readOnly: flags & KernelABI.flagReadOnly != 0, clusterLog: log, cookie: cookie)
        switch format {
        case KernelABI.formatRaw:
            guard stack.isEmpty else { throw .invalid("a raw delta can only be the base") }
            delta.raw = true
        case KernelABI.formatPloop1:
            guard let h = try Self.header(of: fd) else { throw .image(.notPloop1(path)) }
            guard h.clusterSectors == 1 << log else { throw .invalid("\(path): cluster of \(h.clusterSectors) sectors, not 2^\(log)") }
            if h.inUse { throw .image(.inUse(path)) }
            if let v = stack.compactMap(\.version).first, v != h.version { throw .invalid("\(path): another header version") }
            delta.version = h.version
        default:
            throw .invalid("unknown delta format \(format)")
        }
        pending.withLock { $0[n, default: []].append(delta) }
    }

    func start(_ n: Int) throws(DeviceError) {
        let dev = DeviceName.name(n)
        if running(n) != nil { throw .deviceInUse(dev) }
        guard let stack = pending.withLock({ $0[n] }), let base = stack.first else {
            throw .system("START without deltas", errno: ENOENT)
        }
        _ = try lower.mount(MountRequest(
            images: stack.map(\.path), baseFormat: base.raw ? .raw : .ploop1, readOnly: stack.last!.readOnly, device: dev,
            clusterSectors: 1 << base.clusterLog))
        pending.withLock { _ = $0.removeValue(forKey: n) }
        let version = stack.compactMap(\.version).first
        publish(n, version: version.map { $0 == .v1 ? 1 : 2 }, cookie: stack.last?.cookie)
    }

    func snapshot(_ n: Int, _ a: Bytes) throws(DeviceError) {
        let dev = DeviceName.name(n)
        guard let info = running(n) else { throw .notRunning(dev) }
        let state = try lower.balloon(dev, inflate: false, keepIntact: true).state
        guard state == .off else { throw .busy(state) }
        let fd = try a.s32(24)
        let path = try Self.path(of: fd)
        // What user space made must be an empty delta of the device's geometry.
        guard let h = try Self.header(of: fd) else { throw .image(.notPloop1(path)) }
        guard h.virtualBytes == info.sizeBytes, h.clusterBytes == info.clusterBytes, !h.inUse else {
            throw .invalid("\(path) does not match the device's size and cluster")
        }
        guard (try? File(borrowing: fd, path: path).size()) == h.layout.firstDataOffset else {
            throw .invalid("\(path) is not an empty delta")
        }
        PathInfo.remove(path)
        try lower.snapshot(dev, newDelta: path)
        publish(n)
    }

    func deleteStopped(_ n: Int, _ level: Int) throws(DeviceError) {
        let removed = pending.withLock { p -> Bool in
            guard var s = p[n], level < s.count else { return false }
            s.remove(at: level)
            p[n] = s
            return true
        }
        let dir = "\(directory(n))/pdelta/\(level)"
        if FileManager.default.fileExists(atPath: dir) {
            try? FileManager.default.removeItem(atPath: dir)
        } else if !removed {
            throw .invalid("no level \(level)")
        }
    }

    // MARK: - sysfs

    func directory(_ n: Int) -> String { "\(sysfsRoot)/block/ploop\(n)" }

    func write(_ n: Int, _ relative: String, _ value: String) {
        let path = "\(directory(n))/\(relative)"
        try? FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try? Data((value + "\n").utf8).write(to: URL(fileURLWithPath: path), options: .atomic)
    }

    /// Writes what the kernel shows of a running device; the version and cookie are kept from
    /// START when not given.
    func publish(_ n: Int, version: Int? = nil, cookie: String? = nil) {
        guard let info = running(n) else { return }
        write(n, "size", String(info.sizeBytes / 512))
        write(n, "pstate/running", info.running ? "1" : "0")
        write(n, "pstate/block_size", String(info.clusterBytes / 512))
        write(n, "pstate/top", String(info.levels.count - 1))
        if let version { write(n, "pstate/fmt_version", String(version)) }
        if let cookie { write(n, "pstate/cookie", cookie) }
        try? FileManager.default.removeItem(atPath: "\(directory(n))/pdelta")
        for l in info.levels {
            write(n, "pdelta/\(l.level)/level", String(l.level))
            write(n, "pdelta/\(l.level)/image", l.path)
            write(n, "pdelta/\(l.level)/format", l.format.rawValue)
            write(n, "pdelta/\(l.level)/ro", l.readOnly ? "1" : "0")
            write(n, "pdelta/\(l.level)/io", "direct")
        }
    }
}
