import CPloopSys
import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopSystem

/// `DeviceBackend` on the kernel ploop driver: each operation is the ioctl sequence the original
/// user space issues, and what a device is comes from sysfs. Lower-range online merges are done as
/// the original does them: the read-only levels are merged offline into their base while the device
/// runs, the kernel learns of moved clusters (UPDATE_INDEX), and the merged levels leave the stack
/// (DEL_DELTA); a range that reaches the top ends with the kernel's own MERGE.
public final class KernelBackend: DeviceBackend {
    public let name = "kernel"
    public let transport: any KernelTransport
    /// How long umount retries a device that something else still holds open.
    public let umountTimeout: Double

    public init(transport: any KernelTransport = SystemTransport(), umountTimeout: Double = 60) {
        self.transport = transport
        self.umountTimeout = umountTimeout
    }

    /// Why the real driver cannot be used here, or nil.
    public static func unavailableReason(sysfs root: String = "/sys") -> String? {
        if !KernelDeviceState.module(sysfs: root).loaded {
            return "the ploop kernel module is not loaded (\(root)/module/ploop is missing): load it with 'modprobe ploop', or use --backend simulator"
        }
        if !Host.isRoot { return "the kernel backend needs root" }
        return nil
    }

    // MARK: - Calls

    func index(_ device: String) throws(DeviceError) -> Int {
        guard let n = DeviceName.index(device) else { throw .badDeviceName(device) }
        return n
    }

    /// One ioctl; a negative answer becomes the error `failure` makes of its errno.
    @discardableResult
    func call(
        _ n: Int, _ op: KernelIoctl, _ argument: UnsafeMutableRawPointer? = nil,
        failure: (Int32) throws(DeviceError) -> DeviceError
    ) throws(DeviceError) -> Int32 {
        let r = try transport.ioctl(device: n, request: op.request, argument: argument)
        guard r < 0 else { return r }
        throw try failure(-r)
    }

    /// The usual reading of an errno: EBUSY names the maintenance in the way, the rest say which
    /// call failed and why.
    func standard(_ n: Int, _ op: KernelIoctl, _ e: Int32, invalid: String? = nil) -> DeviceError {
        let dev = DeviceName.name(n)
        switch e {
        case EBUSY:
            if let s = try? currentState(n), s != .off { return .busy(s) }
            return .deviceInUse(dev)
        case EINVAL: return .invalid(invalid ?? "\(dev) refused \(op) (EINVAL): the device is not in a state for it")
        case ENOTTY: return .unavailable("\(dev) does not know \(op) (ENOTTY): the loaded driver is too old, or this is not a ploop device")
        case EPERM, EACCES: return .unavailable("\(op) on \(dev): permission denied: run as root on the host (not inside a container)")
        case EAGAIN: return .again
        case ECONNABORTED: return .aborted
        case EOPNOTSUPP: return .notSupported("\(op) on \(dev)")
        case EROFS: return .readOnly(dev)
        default: return .system("\(op) on \(dev)", errno: e)
        }
    }

    func currentState(_ n: Int) throws(DeviceError) -> MaintenanceState {
        try balloonCall(n, inflate: false, keepIntact: true).state
    }

    /// What sysfs says of a device, or `noSuchDevice` when it has no deltas.
    func sysfs(_ n: Int) throws(DeviceError) -> KernelDeviceState {
        let st: KernelDeviceState
        do { st = try KernelDeviceState.read(sysfs: transport.sysfsRoot, index: n) } catch {
            if case .missing = error { throw .noSuchDevice(DeviceName.name(n)) }
            throw .invalid(error.description)
        }
        guard !st.deltas.isEmpty else { throw .noSuchDevice(DeviceName.name(n)) }
        return st
    }

    static func clusterLog(_ sectors: UInt32) -> UInt32 { UInt32(sectors.trailingZeroBitCount) }

    // MARK: - Mount and umount

    /// What user space checks before handing images to the kernel (the original runs `check` on
    /// each): `MountRequest.probe`, with one header version. Returns the cluster size in sectors.
    static func validate(_ request: MountRequest) throws(DeviceError) -> UInt32 {
        try request.probe(oneVersion: true) { (path, _) throws(ImageError) in try ImagePath.open(path, write: false) }.clusterSectors
    }

    /// A free device: the kernel's GETDEVICE answer (asked on /dev/ploop0, as the manual allows).
    func freeDevice() throws(DeviceError) -> Int {
        var ctl = cploop_getdevice_ctl()
        try IoctlArgument.with(&ctl) { (p) throws(DeviceError) in
            try call(0, .getDevice, p) { (e) throws(DeviceError) in
                e == ERANGE ? .unavailable("no free ploop device is left") : standard(0, .getDevice, e)
            }
        }
        return Int(ctl.minor) >> 4
    }

    public func mount(_ request: MountRequest) throws(DeviceError) -> String {
        let clusterSectors = try Self.validate(request)
        let n: Int
        if let d = request.device {
            n = try index(d)
            if (try? sysfs(n)) != nil { throw .deviceInUse(DeviceName.name(n)) }
        } else {
            n = try freeDevice()
        }
        let dev = DeviceName.name(n)
        var added = 0
        do throws(DeviceError) {
            for (i, path) in request.images.enumerated() {
                let writable = i == request.images.count - 1 && !request.readOnly
                let file = try lifting { () throws(ImageError) in try PosixBlockFile(path: path, mode: writable ? .readWrite : .readOnly) }
                let raw = i == 0 && request.baseFormat == .raw
                try addDelta(n, fd: file.file.fd, format: raw ? KernelABI.formatRaw : KernelABI.formatPloop1,
                    readOnly: !writable, clusterSectors: clusterSectors, path: path)
                added += 1
            }
            try call(n, .start) { (e) throws(DeviceError) in
                e == EBUSY ? .deviceInUse(dev) : standard(n, .start, e)
            }
        } catch {
            // As the original: the added levels go top-down, then the device is cleared.
            dropLevels(n, count: added)
            _ = try? transport.ioctl(device: n, request: KernelIoctl.clear.request, argument: nil)
            throw error
        }
        return dev
    }

    /// DEL_DELTA of levels `count - 1` down to 0, as cleanup: failures are left to CLEAR.
    func dropLevels(_ n: Int, count: Int) {
        for level in stride(from: count - 1, through: 0, by: -1) {
            var l = UInt32(level)
            _ = try? IoctlArgument.with(&l) { (p) throws(DeviceError) in try transport.ioctl(device: n, request: KernelIoctl.delDelta.request, argument: p) }
        }
    }

    /// `ploop_ctl` with its one chunk, for ADD_DELTA and SNAPSHOT.
    static func deltaControl(format: UInt32, flags: UInt32, clusterSectors: UInt32, fd: Int32) -> cploop_ctl_delta {
        var ctl = cploop_ctl_delta()
        ctl.c.pctl_format = format
        ctl.c.pctl_flags = flags
        ctl.c.pctl_cluster_log = clusterLog(clusterSectors)
        ctl.c.pctl_chunks = 1
        ctl.f.pctl_fd = fd
        ctl.f.pctl_type = KernelABI.ioAuto
        return ctl
    }

    func addDelta(_ n: Int, fd: Int32, format: UInt32, readOnly: Bool, clusterSectors: UInt32, path: String) throws(DeviceError) {
        var ctl = Self.deltaControl(format: format, flags: readOnly ? KernelABI.flagReadOnly : 0, clusterSectors: clusterSectors, fd: fd)
        try IoctlArgument.with(&ctl) { (p) throws(DeviceError) in
            try call(n, .addDelta, p) { (e) throws(DeviceError) in
                switch e {
                case EBUSY: .image(.inUse(path))
                case EINVAL: .invalid("the kernel refused \(path) as a level of \(DeviceName.name(n)) (EINVAL): its header or size does not fit the levels below")
                default: standard(n, .addDelta, e)
                }
            }
        }
    }

    public func umount(_ device: String) throws(DeviceError) {
        let n = try index(device)
        let st = try sysfs(n)
        var stopped = false
        if st.running {
            var delay = 0.01
            let deadline = Date().addingTimeInterval(umountTimeout)
            while true {
                let r = try transport.ioctl(device: n, request: KernelIoctl.stop.request, argument: nil)
                if r >= 0 { stopped = true; break }
                if r == -EINVAL { break }
                guard r == -EBUSY else { throw standard(n, .stop, -r) }
                // A maintenance will not end by waiting; a holder (udev, a late close) may.
                let s = try currentState(n)
                if s != .off { throw .busy(s) }
                if Date() > deadline {
                    // Name the processes where /proc shows them (a mounted file system is no process's).
                    let holders = PartitionNodes.openers(device, excluding: [Host.processID])
                    if !holders.isEmpty { throw .heldOpen(device, by: holders.map(\.description)) }
                    throw .deviceInUse("\(device) (still held open: unmount its file system and close what uses it)")
                }
                Thread.sleep(forTimeInterval: delay)
                delay = min(delay * 2, 0.5)
            }
        }
        // Not running (a failed start; STOP said EINVAL): the levels go one by one.
        if !stopped { dropLevels(n, count: st.deltas.count) }
        try call(n, .clear) { (e) throws(DeviceError) in standard(n, .clear, e) }
    }

    // MARK: - Snapshot, merge, grow, sync

    public func snapshot(_ device: String, newDelta: String) throws(DeviceError) {
        let n = try index(device)
        let st = try sysfs(n)
        guard st.running else { throw .notRunning(device) }
        guard let sectors = st.sizeSectors else { throw .invalid("\(transport.sysfsRoot)/block/ploop\(n)/size is missing") }
        let version: FormatVersion = st.formatVersion == 1 ? .v1 : .v2
        guard sectors % UInt64(st.blockSize) == 0 else {
            throw .notClusterMultiple(bytes: sectors * 512, clusterBytes: Int(st.blockSize) * 512)
        }
        let header: ImageHeader
        do { header = try ImageHeader.new(sizeSectors: sectors, clusterSectors: st.blockSize, version: version) } catch {
            throw .image(.format(newDelta, error))
        }
        // User space makes the empty delta (whole, or not at all); the kernel takes it over by its
        // descriptor.
        let file = try lifting { () throws(ImageError) in try ImagePath.createImage(newDelta, header: header, lock: false) }
        do throws(DeviceError) {
            var ctl = Self.deltaControl(format: KernelABI.formatPloop1, flags: KernelABI.flagFSSync, clusterSectors: st.blockSize, fd: file.file.fd)
            ctl.c.pctl_level = UInt8(truncatingIfNeeded: st.deltas.count)
            try IoctlArgument.with(&ctl) { (p) throws(DeviceError) in
                try call(n, .snapshot, p) { (e) throws(DeviceError) in standard(n, .snapshot, e) }
            }
        } catch {
            PathInfo.removeRegularFile(newDelta)
            throw error
        }
    }

    public func merge(_ device: String, levels range: ClosedRange<Int>, progress: (@Sendable (Int, Int) -> Void)?) throws(DeviceError) -> [String] {
        let n = try index(device)
        let st = try sysfs(n)
        let state = try currentState(n)
        guard state == .off else { throw .busy(state) }
        let top = st.deltas.count - 1
        guard range.lowerBound >= 0, range.upperBound <= top, range.lowerBound < range.upperBound else {
            throw .levelsOutOfRange(range, top: top)
        }
        let paths = st.deltas.map(\.image)
        let l1 = range.lowerBound
        // The read-only part of the range, merged by user space.
        let lowerTop = range.upperBound == top ? range.upperBound - 1 : range.upperBound
        if lowerTop > l1 {
            try mergeOffline(n, into: st.deltas[l1], sources: Array(paths[(l1 + 1)...lowerTop]), clusterSectors: st.blockSize, progress: progress)
            // Each merged level leaves; the next one down to l1 + 1 takes its place.
            for _ in (l1 + 1)...lowerTop { try deleteDelta(device, level: l1 + 1) }
        }
        if range.upperBound == top {
            try call(n, .merge) { (e) throws(DeviceError) in standard(n, .merge, e) }
        }
        return Array(paths[(l1 + 1)...range.upperBound])
    }

    /// Copies the clusters of `sources` (read-only levels above `dest`, bottom first) into the
    /// level `dest`'s file while the device runs. Reads keep coming from the sources until they
    /// leave the stack, so nothing the device serves changes; clusters a growing destination moves
    /// are reported to the kernel before their old place is reused.
    func mergeOffline(_ n: Int, into dest: KernelDeviceState.Delta, sources: [String], clusterSectors: UInt32, progress: (@Sendable (Int, Int) -> Void)?) throws(DeviceError) {
        let destPath = dest.image
        let l1 = dest.level
        var indexFailure: DeviceError?
        do {
            let images = try sources.reversed().map { (p) throws(ImageError) in try Ploop1Image(file: try ImagePath.open(p, write: false), writable: false) }
            let destFile = try ImagePath.open(destPath, write: true)
            let destination: MergeDestination
            if dest.format == .raw {
                destination = .raw(RawImage(file: destFile, clusterBytes: Int(clusterSectors) * 512))
            } else {
                destination = .ploop1(try Ploop1Image(file: destFile, writable: true))
            }
            _ = try Offline.merge(sources: images, into: destination, progress: progress.map { p in { p($0, $1) } }) { (cluster, block) throws(ImageError) in
                do throws(DeviceError) {
                    try self.updateIndex(DeviceName.name(n), level: l1, maps: [IndexMap(cluster: UInt32(cluster.value), block: block.value)])
                } catch {
                    indexFailure = error
                    throw .io(SystemError("PLOOP_IOC_UPDATE_INDEX", path: DeviceName.name(n), errno: EIO))
                }
            }
            if case .ploop1(let d) = destination { try d.close() }
        } catch {
            throw indexFailure ?? .image(error)
        }
    }

    public func grow(_ device: String, sizeSectors: UInt64) throws(DeviceError) {
        let n = try index(device)
        let st = try sysfs(n)
        let current = st.sizeSectors ?? 0
        if sizeSectors < current {
            throw .cannotShrink(fromSectors: current, toSectors: sizeSectors)
        }
        var ctl = cploop_ctl()
        ctl.pctl_cluster_log = Self.clusterLog(st.blockSize)
        if sizeSectors % UInt64(st.blockSize) == 0, let clusters = UInt32(exactly: sizeSectors / UInt64(st.blockSize)) {
            ctl.pctl_flags = KernelABI.flagClusterBlocks
            ctl.pctl_size = clusters
        } else if let s = UInt32(exactly: sizeSectors) {
            ctl.pctl_size = s
        } else {
            throw .invalid("\(sizeSectors) sectors is not a whole number of clusters of \(st.blockSize) sectors")
        }
        try IoctlArgument.with(&ctl) { (p) throws(DeviceError) in
            try call(n, .grow, p) { (e) throws(DeviceError) in
                switch e {
                case EFBIG: .invalid("\(sizeSectors) sectors is beyond what the image format of \(device) can hold")
                default: standard(n, .grow, e, invalid: "the kernel refused to grow \(device) to \(sizeSectors) sectors (EINVAL): the size must be a whole number of clusters")
                }
            }
        }
    }

    public func sync(_ device: String) throws(DeviceError) {
        let n = try index(device)
        try call(n, .sync) { (e) throws(DeviceError) in standard(n, .sync, e) }
    }

    /// PLOOP_IOC_FREEZE: the driver freezes the file system mounted on the device (what FIFREEZE
    /// on its mount point does, for callers that know only the device).
    public func freeze(_ device: String) throws(DeviceError) {
        let n = try index(device)
        try call(n, .freeze) { (e) throws(DeviceError) in standard(n, .freeze, e, invalid: "\(device) has no frozen-able file system mounted, or it is frozen already") }
    }

    /// PLOOP_IOC_THAW.
    public func thaw(_ device: String) throws(DeviceError) {
        let n = try index(device)
        try call(n, .thaw) { (e) throws(DeviceError) in standard(n, .thaw, e, invalid: "\(device) is not frozen") }
    }

    public func deleteDelta(_ device: String, level: Int) throws(DeviceError) {
        let n = try index(device)
        guard var l = UInt32(exactly: level) else { throw .invalid("level \(level) is not a level") }
        try IoctlArgument.with(&l) { (p) throws(DeviceError) in
            try call(n, .delDelta, p) { (e) throws(DeviceError) in standard(n, .delDelta, e) }
        }
    }

    public func updateIndex(_ device: String, level: Int, maps: [IndexMap]) throws(DeviceError) {
        let n = try index(device)
        var ctl = cploop_index_update_ctl()
        ctl.n_maps = UInt32(maps.count)
        ctl.level = UInt8(truncatingIfNeeded: level)
        var tail = maps.map { cploop_reloc_map(req_cluster: $0.cluster, iblk: $0.block) }
        try IoctlArgument.with(&ctl, tail: &tail) { (p) throws(DeviceError) in
            try call(n, .updateIndex, p) { (e) throws(DeviceError) in standard(n, .updateIndex, e) }
        }
    }

    // MARK: - Balloon

    func balloonCall(_ n: Int, inflate: Bool, keepIntact: Bool) throws(DeviceError) -> BalloonReply {
        var ctl = cploop_balloon_ctl()
        ctl.inflate = inflate ? 1 : 0
        ctl.keep_intact = keepIntact ? 2 : 0
        try IoctlArgument.with(&ctl) { (p) throws(DeviceError) in
            try call(n, .balloon, p) { (e) throws(DeviceError) in
                switch e {
                case EINVAL where inflate && keepIntact: .conflictingFlags("inflate and keep-intact together")
                case EBUSY: .busy(MaintenanceState(rawValue: p.load(as: UInt32.self)) ?? .off)
                default: standard(n, .balloon, e)
                }
            }
        }
        guard let state = MaintenanceState(rawValue: ctl.mntn_type) else {
            throw .invalid("the kernel answered an unknown maintenance state \(ctl.mntn_type)")
        }
        return BalloonReply(state: state, allocHead: ctl.alloc_head, level: Int(ctl.level))
    }

    public func balloon(_ device: String, inflate: Bool, keepIntact: Bool) throws(DeviceError) -> BalloonReply {
        try balloonCall(try index(device), inflate: inflate, keepIntact: keepIntact)
    }

    public func loadFreeBlocks(_ device: String, level: Int, extents: [FreeExtent]) throws(DeviceError) -> UInt32 {
        let n = try index(device)
        var ctl = cploop_freeblks_ctl()
        ctl.n_extents = UInt32(extents.count)
        ctl.level = UInt8(truncatingIfNeeded: level)
        var tail = extents.map { cploop_freeblks_ctl_extent(clu: $0.cluster, iblk: $0.block, len: $0.length) }
        try IoctlArgument.with(&ctl, tail: &tail) { (p) throws(DeviceError) in
            try call(n, .freeBlocks, p) { (e) throws(DeviceError) in
                if e == EINVAL, (try? currentState(n)) == .off { return .wrongState(.loadFreeBlocks, .off) }
                return standard(n, .freeBlocks, e, invalid: "the kernel refused the free blocks of level \(level) (EINVAL): the level must be the top")
            }
        }
        return ctl.alloc_head
    }

    public func freeBlockList(_ device: String) throws(DeviceError) -> [FreeExtent] {
        let n = try index(device)
        // Two calls, as the original: the count, then the extents.
        var ctl = cploop_freeblks_ctl()
        try IoctlArgument.with(&ctl) { (p) throws(DeviceError) in
            try call(n, .fbGet, p) { (e) throws(DeviceError) in standard(n, .fbGet, e) }
        }
        guard ctl.n_extents > 0 else { return [] }
        var tail = [cploop_freeblks_ctl_extent](repeating: cploop_freeblks_ctl_extent(), count: Int(ctl.n_extents))
        try IoctlArgument.with(&ctl, tail: &tail) { (p) throws(DeviceError) in
            try call(n, .fbGet, p) { (e) throws(DeviceError) in standard(n, .fbGet, e) }
        }
        return tail.prefix(Int(ctl.n_extents)).map { FreeExtent(cluster: $0.clu, block: $0.iblk, length: $0.len) }
    }

    public func filterFreeBlocks(_ device: String, minLength: UInt32) throws(DeviceError) {
        let n = try index(device)
        // The minimum length travels as the argument's value.
        try call(n, .fbFilter, UnsafeMutableRawPointer(bitPattern: UInt(minLength))) { (e) throws(DeviceError) in standard(n, .fbFilter, e) }
    }

    public func dropFreeBlocks(_ device: String) throws(DeviceError) {
        let n = try index(device)
        try call(n, .fbDrop) { (e) throws(DeviceError) in standard(n, .fbDrop, e) }
    }

    public func relocateBlocks(_ device: String, level: Int, allocHead: UInt32, extents: [RelocExtent]) throws(DeviceError) -> UInt32 {
        let n = try index(device)
        var ctl = cploop_relocblks_ctl()
        ctl.n_extents = UInt32(extents.count)
        ctl.alloc_head = allocHead
        ctl.level = UInt8(truncatingIfNeeded: level)
        var tail = extents.map { cploop_relocblks_ctl_extent(clu: $0.cluster, iblk: $0.block, len: $0.length, free: $0.free ? 1 : 0) }
        try IoctlArgument.with(&ctl, tail: &tail) { (p) throws(DeviceError) in
            try call(n, .relocBlocks, p) { (e) throws(DeviceError) in
                if e == EINVAL, let st = try? currentState(n), st != .fbloaded, st != .reloc { return .wrongState(.relocateBlocks, st) }
                return standard(n, .relocBlocks, e, invalid: "the kernel refused the relocation (EINVAL): free blocks must be loaded first, and the level and allocation head must be the frozen ones")
            }
        }
        return ctl.alloc_head
    }

    // MARK: - Dirty tracking

    public func trackInit(_ device: String) throws(DeviceError) -> UInt64 {
        let n = try index(device)
        var e = cploop_track_extent()
        try IoctlArgument.with(&e) { (p) throws(DeviceError) in
            try call(n, .trackInit, p) { (err) throws(DeviceError) in standard(n, .trackInit, err) }
        }
        return e.end
    }

    public func trackSetPosition(_ device: String, _ position: UInt64) throws(DeviceError) {
        let n = try index(device)
        var pos = position
        try IoctlArgument.with(&pos) { (p) throws(DeviceError) in
            try call(n, .trackSetPos, p) { (e) throws(DeviceError) in
                standard(n, .trackSetPos, e, invalid: "tracking position \(position) moves backwards (only a reset to 0 may)")
            }
        }
    }

    public func trackRead(_ device: String) throws(DeviceError) -> Range<UInt64>? {
        let n = try index(device)
        var e = cploop_track_extent()
        let r = try IoctlArgument.with(&e) { (p) throws(DeviceError) in try transport.ioctl(device: n, request: KernelIoctl.trackRead.request, argument: p) }
        if r == -EAGAIN { return nil }
        if r < 0 { throw standard(n, .trackRead, -r) }
        return e.start..<e.end
    }

    public func trackStop(_ device: String) throws(DeviceError) {
        let n = try index(device)
        try call(n, .trackStop) { (e) throws(DeviceError) in
            e == EBUSY && (try? currentState(n)) == .track ? .unreadExtents : standard(n, .trackStop, e)
        }
    }

    public func trackAbort(_ device: String) throws(DeviceError) {
        let n = try index(device)
        try call(n, .trackAbort) { (e) throws(DeviceError) in standard(n, .trackAbort, e) }
    }

    // MARK: - Status

    public func info(_ device: String) throws(DeviceError) -> DeviceInfo {
        let n = try index(device)
        return try info(n, try sysfs(n))
    }

    func info(_ n: Int, _ st: KernelDeviceState) throws(DeviceError) -> DeviceInfo {
        DeviceInfo(
            device: DeviceName.name(n), backend: name, sizeBytes: (st.sizeSectors ?? 0) * 512, clusterBytes: Int(st.blockSize) * 512,
            state: st.running ? try currentState(n) : .off, running: st.running,
            levels: st.deltas.map { LevelInfo(level: $0.level, path: $0.image, format: $0.format, readOnly: $0.readOnly) },
            mergeProgress: nil)
    }

    public func list() throws(DeviceError) -> [DeviceInfo] {
        KernelDeviceState.indexes(sysfs: transport.sysfsRoot).compactMap { n in
            guard let st = try? sysfs(n) else { return nil }
            return try? info(n, st)
        }
    }

    public func openIO(_ device: String) throws(DeviceError) -> any DeviceIO {
        let n = try index(device)
        _ = try sysfs(n)
        return try transport.openIO(device: n)
    }
}
