import CPloopSys
import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopSystem
import Synchronization

/// The device-mapper driver of ploop 8/9 (dm-ploop), driven as the original's 9.x drives it
/// (reference dm-ploop.md §4): a device `/dev/mapper/ploopM` is created with one `ploop` table
/// whose line carries descriptors of the images, the top marked in use by us before the load and
/// cleared by us after the removal.
///
/// Mount, umount, info, list, block I/O, online snapshot and grow, online merges (of read-only
/// levels by user-space copy and `notify_merged_backward`; of the top as the reverse merge),
/// copy with write tracking (the tracking target). The legacy balloon ioctls have no dm-ploop
/// equivalent (the original's 9.x keeps only `balloon show|change|discard`, as file operations).
public final class DMPloopBackend: DeviceBackend {
    public let name = "dm-ploop"
    let transport: any DMTransport
    let io: @Sendable (String) throws(DeviceError) -> any DeviceIO
    /// How long umount waits for a device that is still open (the original polls for 60 s).
    let umountTimeout: Double

    /// `io(name)` gives block I/O on device `name` (the node on a host, the fake's model in tests).
    public init(transport: any DMTransport, umountTimeout: Double = 60, io: @escaping @Sendable (String) throws(DeviceError) -> any DeviceIO) {
        self.transport = transport
        self.umountTimeout = umountTimeout
        self.io = io
    }

    /// Device-mapper through `transport` (the host's by default), I/O through the device nodes.
    public convenience init(transport: any DMTransport = SystemDMTransport(), umountTimeout: Double = 60) {
        self.init(transport: transport, umountTimeout: umountTimeout) { (name: String) throws(DeviceError) -> any DeviceIO in
            try BlockDeviceIO(device: DMPloop.node(named: name))
        }
    }

    /// Over a fake device-mapper in this process.
    public convenience init(fake: FakeDeviceMapper, umountTimeout: Double = 60) {
        self.init(transport: fake, umountTimeout: umountTimeout) { (name: String) throws(DeviceError) -> any DeviceIO in try fake.openIO(name) }
    }

    /// Why dm-ploop cannot be used here, or nil when device-mapper answers and has the `ploop`
    /// target registered.
    public static func unavailableReason(transport: any DMTransport = SystemDMTransport()) -> String? {
        var b: [UInt8]
        do { b = try DM.Request(.listVersions).encode() } catch { return "\(error)" }
        let rc: Int32
        do { rc = try transport.ioctl(DM.Command.listVersions.request, &b) } catch { return "\(error)" }
        guard rc == 0 else { return "device-mapper does not list its targets (\(SystemError.words(-rc)))" }
        guard let types = try? DM.Reply(b).targetTypes() else { return "device-mapper answered a target list that does not parse" }
        guard types.contains(where: { $0.name == DMPloop.targetType }) else {
            return "the device-mapper target 'ploop' is not registered (targets: \(types.map(\.name).joined(separator: ", "))): load dm-ploop ('modprobe dm_ploop')"
        }
        return nil
    }

    // MARK: - Talking to device-mapper

    /// Sends a request; on success the answer (asked again with a bigger buffer while it did not
    /// fit), else the errno as a `DeviceError` that says what to do.
    func send(_ request: DM.Request, what: String) throws(DeviceError) -> DM.Reply {
        var r = request
        while true {
            var b = try r.encode()
            let rc = try transport.ioctl(r.command.request, &b)
            if rc < 0 { throw Self.error(-rc, request: r, what: what) }
            let reply = DM.Reply(b)
            if reply.bufferFull && r.bufferSize < 16 << 20 {
                r.bufferSize *= 4
                continue
            }
            return reply
        }
    }

    static func error(_ e: Int32, request: DM.Request, what: String) -> DeviceError {
        let dev = "/dev/mapper/\(request.name)"
        switch (request.command, e) {
        case (_, ENXIO) where request.command != .tableLoad, (_, ENODEV):
            return .noSuchDevice(dev)
        case (.tableLoad, EINVAL) where request.targets.first?.type == DMPloop.targetType:
            return .invalid("\(what): the kernel refused the ploop table (\(SystemError.words(e))): is the dm-ploop target registered ('modprobe dm-ploop'; 'dmsetup targets' lists it)?")
        case (.tableLoad, ENOLCK):
            return .invalid("\(what): the top image is not marked in use (\(SystemError.words(e)))")
        case (.tableLoad, FakeDeviceMapper.enotsupp):
            return .invalid("\(what): dm-ploop attaches version 2 images only: convert with 'ploop convert -v 2'")
        case (.devRemove, EBUSY):
            return .deviceInUse("\(dev) (it is open: unmount what uses it)")
        case (.targetMessage, FakeDeviceMapper.enotsupp):
            return .notSupported("\(what): the dm-ploop target of this kernel has no such message")
        case (_, ENOTTY):
            return .unavailable("\(what): the control node does not take device-mapper requests (\(SystemError.words(e))): is it /dev/mapper/control of a kernel with device-mapper 4.x?")
        case (_, EPERM), (_, EACCES):
            return .unavailable("\(what): \(SystemError.words(e)): device-mapper needs root (CAP_SYS_ADMIN)")
        default:
            return .system("\(what) (\(request.command) on \(dev))", errno: e)
        }
    }

    /// DM_DEV_SUSPEND with the suspend flag: the device's I/O held, what it caches flushed.
    func suspend(_ name: String) throws(DeviceError) {
        _ = try send(DM.Request(.devSuspend, name: name, flags: .suspend), what: "suspending \(name)")
    }

    /// DM_DEV_SUSPEND without it: the device resumed, on its inactive table if one was loaded.
    func resume(_ name: String) throws(DeviceError) {
        _ = try send(DM.Request(.devSuspend, name: name), what: "resuming \(name)")
    }

    func message(_ name: String, _ m: DMPloop.Message) throws(DeviceError) -> String? {
        try send(DM.Request(.targetMessage, name: name, message: m.text), what: "dm-ploop message '\(m.text)'").messageResponse
    }

    static func dmName(_ device: String) throws(DeviceError) -> String {
        let base = device.hasPrefix("/dev/mapper/") ? String(device.dropFirst(12)) : device
        guard base.hasPrefix("ploop"), let n = Int(base.dropFirst(5)), n >= 0 else { throw .badDeviceName(device) }
        return base
    }

    // MARK: - Mount and umount

    public func mount(_ request: MountRequest) throws(DeviceError) -> String {
        // The checks the original makes before a load, on files opened for that only.
        let (probes, clusterSectors) = try request.probe(oneVersion: true) { (path, writable) throws(ImageError) in
            try ImagePath.open(path, write: writable)
        }
        for p in probes where p.header != nil && p.header!.version != .v2 {
            throw .invalid("\(p.path) is a version 1 image: dm-ploop attaches version 2 images only: convert with 'ploop convert -v 2'")
        }
        let top = probes[probes.count - 1]
        let sectors: UInt64
        if let h = top.header { sectors = h.sizeInSectors } else { sectors = try lifting { () throws(ImageError) in try top.file.size() } / 512 }
        let writable = !request.readOnly
        // Descriptors as the original opens them: O_DIRECT (where the file system takes it),
        // read-only below the top. No exec follows here (the original's survive a fork of
        // dmsetup; ours go straight into the ioctl), so they are not inherited.
        let fds = try Self.openDeltas(probes.map(\.path), writable: writable ? 1 : 0)
        defer { for fd in fds { close(fd) } }
        // The top is ours to mark before the load (the target refuses an unmarked one).
        if writable, top.header != nil { try Self.setInUse(top.path, true) }
        var made: String?
        do {
            let name = try freeName(request.device)
            _ = try send(DM.Request(.devCreate, name: name, flags: .persistentDevice, dev: DM.encodeDev(major: FakeDeviceMapper.major, minor: UInt32(name.dropFirst(5))!)), what: "creating \(name)")
            made = name
            let table = DMPloop.Table(clusterLog: DMPloop.Table.clusterLog(sectors: clusterSectors), fds: fds, rawBase: request.baseFormat == .raw)
            _ = try send(DM.Request(.tableLoad, name: name, flags: writable ? [] : .readOnly, targets: [DM.Target(length: sectors, type: DMPloop.targetType, params: table.params)]), what: "loading the ploop table of \(name)")
            try resume(name)
            return DMPloop.node(named: name)
        } catch {
            if let n = made { _ = try? send(DM.Request(.devRemove, name: n), what: "removing \(n)") }
            if writable, top.header != nil { try? Self.setInUse(top.path, false) }
            throw error
        }
    }

    /// The name asked for, or a free one as the original picks it: ploopM, M in [1000, 66534].
    func freeName(_ asked: String?) throws(DeviceError) -> String {
        let taken = Set(try devices().map(\.name))
        if let a = asked {
            let n = try Self.dmName(a)
            guard !taken.contains(n) else { throw .deviceInUse(a) }
            return n
        }
        let start = Int.random(in: 0..<0xffff)
        for i in 0..<0xffff {
            let n = DMPloop.name((start + i) % 0xffff + 1000)
            if !taken.contains(n) { return n }
        }
        throw .invalid("Can't generate minor value: every ploop device name is taken")
    }

    public func umount(_ device: String) throws(DeviceError) {
        let name = try Self.dmName(device)
        let f = try found(name)
        let levels = try self.levels(f)
        // Still open (a file system letting go, udev probing): polled as the original does, 10 ms
        // doubling to 0.5 s, until the timeout.
        let deadline = Host.monotonicNanoseconds() + UInt64(max(0, umountTimeout) * 1e9)
        var pause = 0.01
        while true {
            do {
                _ = try send(DM.Request(.devRemove, name: name), what: "removing \(name)")
                break
            } catch .deviceInUse(let what) {
                guard Host.monotonicNanoseconds() < deadline else {
                    // Name the processes where /proc shows them (a mounted file system is no process's).
                    let node = DMPloop.node(named: name)
                    let holders = PartitionNodes.openers(node, excluding: [Host.processID])
                    if !holders.isEmpty { throw .heldOpen(node, by: holders.map(\.description)) }
                    throw .deviceInUse("\(what); still open after \(umountTimeout) s")
                }
                Thread.sleep(forTimeInterval: pause)
                pause = min(pause * 2, 0.5)
            }
        }
        // The kernel never clears the mark: the top is closed once the device is gone.
        if !f.readOnly, let top = levels.last, top.format == .ploop1 { try Self.setInUse(top.path, false) }
    }

    static func setInUse(_ path: String, _ on: Bool) throws(DeviceError) {
        try lifting { () throws(ImageError) in
            let image = try Ploop1Image(file: try ImagePath.open(path, write: true), writable: true, allowDirty: true, markInUse: false)
            try image.setInUse(on)
        }
    }

    // MARK: - What runs

    struct Found {
        var name: String
        /// The device whose table is the ploop one: `name`, or `<name>.tracking` while a copy
        /// tracks writes (the tracking table on `name` feeds it).
        var target: String
        var status: DMPloop.Status
        var length: UInt64
        var readOnly: Bool
        var tracked = false
    }

    func devices() throws(DeviceError) -> [(name: String, dev: UInt64)] {
        try send(DM.Request(.listDevices), what: "listing device-mapper devices").devices()
    }

    /// Device `name` if its live table is a ploop one, or a tracking one over its ploop twin.
    func ploop(_ name: String) throws(DeviceError) -> Found? {
        let r = try send(DM.Request(.tableStatus, name: name), what: "status of \(name)")
        guard let t = try r.targets().first else { return nil }
        if t.type == DMPloop.trackingType, !name.hasSuffix(DMPloop.trackingSuffix) {
            guard var f = try ploop(name + DMPloop.trackingSuffix), !f.tracked else { return nil }
            f.name = name
            f.tracked = true
            return f
        }
        guard t.type == DMPloop.targetType else { return nil }
        return Found(name: name, target: name, status: try DMPloop.Status(parsing: t.params), length: t.length, readOnly: r.flags.contains(.readOnly))
    }

    /// Device `name`, which must run a ploop table.
    func found(_ name: String) throws(DeviceError) -> Found {
        guard let f = try ploop(name) else { throw .noSuchDevice("/dev/mapper/\(name)") }
        return f
    }

    /// Device `name` for an operation that changes its table: not while a copy tracks it.
    func changeable(_ name: String) throws(DeviceError) -> Found {
        let f = try found(name)
        if f.tracked { throw .busy(.track) }
        return f
    }

    /// The levels of `f`, base first, from `get_img_name`.
    func levels(_ f: Found) throws(DeviceError) -> [LevelInfo] {
        var out: [LevelInfo] = []
        for l in 0..<f.status.deltas {
            guard let path = try message(f.target, .getImageName(level: l)), !path.isEmpty else { break }
            let format: ImageFormat = (try? ImagePath.detectFormat(ImagePath.open(path, write: false))) ?? .ploop1
            out.append(LevelInfo(level: l, path: path, format: format, readOnly: l < f.status.deltas - 1 || f.readOnly))
        }
        return out
    }

    public func info(_ device: String) throws(DeviceError) -> DeviceInfo {
        let name = try Self.dmName(device)
        let f = try found(name)
        return DeviceInfo(
            device: DMPloop.node(named: name), backend: self.name, sizeBytes: f.length * 512,
            clusterBytes: f.status.clusterSectors * 512, state: f.tracked ? .track : .off, running: true, levels: try levels(f), mergeProgress: nil)
    }

    public func list() throws(DeviceError) -> [DeviceInfo] {
        var out: [DeviceInfo] = []
        for d in try devices() where d.name.hasPrefix("ploop") {
            // Devices of other targets (and ones gone meanwhile) are not ploop devices.
            guard let i = try? info(d.name) else { continue }
            out.append(i)
        }
        return out
    }

    public func openIO(_ device: String) throws(DeviceError) -> any DeviceIO { try io(try Self.dmName(device)) }

    // MARK: - Snapshot and grow: table reloads

    /// Descriptors of `paths` (base first) as a table takes them: O_DIRECT where the file system
    /// allows, the upper `writable` ones read-write (the top; the two upper ones for a reverse
    /// merge), the rest read-only. The caller closes them.
    static func openDeltas(_ paths: [String], writable: Int) throws(DeviceError) -> [Int32] {
        var fds: [Int32] = []
        for (i, p) in paths.enumerated() {
            let rw = i >= paths.count - writable
            var fd = open(p, (rw ? O_RDWR : O_RDONLY) | cploop_o_direct() | O_CLOEXEC)
            if fd < 0 && errno == EINVAL { fd = open(p, (rw ? O_RDWR : O_RDONLY) | O_CLOEXEC) }
            guard fd >= 0 else {
                let e = errno
                for f in fds { close(f) }
                throw .system("open \(p)", errno: e)
            }
            fds.append(fd)
        }
        return fds
    }

    /// Suspends `name`, runs `body`, loads the table of `paths` with `length` sectors, resumes.
    /// The device is resumed whatever happens (on the old table if the load failed).
    func reload(_ f: Found, paths: [String], length: UInt64, raw: Bool, writable: Int = 1, between body: () throws(DeviceError) -> Void) throws(DeviceError) {
        try suspend(f.name)
        do {
            try body()
            let fds = try Self.openDeltas(paths, writable: f.readOnly ? 0 : writable)
            defer { for fd in fds { close(fd) } }
            let table = DMPloop.Table(clusterLog: DMPloop.Table.clusterLog(sectors: UInt32(f.status.clusterSectors)), fds: fds, rawBase: raw)
            _ = try send(DM.Request(.tableLoad, name: f.name, flags: f.readOnly ? .readOnly : [], targets: [DM.Target(length: length, type: DMPloop.targetType, params: table.params)]), what: "reloading the ploop table of \(f.name)")
        } catch {
            try? resume(f.name)
            throw error
        }
        try resume(f.name)
    }

    /// Online snapshot as the original's 9.x makes it (reference §4.3): the empty delta made and
    /// marked in use, the device suspended, the old top's mark cleared, the table reloaded with
    /// the new top, resumed. On failure the old table runs on, the old top is marked again and the
    /// new file goes.
    public func snapshot(_ device: String, newDelta: String) throws(DeviceError) {
        let name = try Self.dmName(device)
        let f = try changeable(name)
        guard !f.readOnly else { throw .readOnly(device) }
        let levels = try self.levels(f)
        guard let oldTop = levels.last else { throw .noSuchDevice(device) }
        let cs = UInt32(f.status.clusterSectors)
        guard f.length % UInt64(cs) == 0 else { throw .notClusterMultiple(bytes: f.length * 512, clusterBytes: Int(cs) * 512) }
        let header: ImageHeader
        do { header = try ImageHeader.new(sizeSectors: f.length, clusterSectors: cs, version: .v2) } catch { throw .image(.format(newDelta, error)) }
        _ = try lifting { () throws(ImageError) in try ImagePath.createImage(newDelta, header: header, lock: false) }
        var clearedOld = false
        do {
            try Self.setInUse(newDelta, true)
            try reload(f, paths: levels.map(\.path) + [newDelta], length: f.length, raw: levels.first?.format == .raw) { () throws(DeviceError) in
                if oldTop.format == .ploop1 {
                    try Self.setInUse(oldTop.path, false)
                    clearedOld = true
                }
            }
        } catch {
            if clearedOld { try? Self.setInUse(oldTop.path, true) }
            PathInfo.removeRegularFile(newDelta)
            throw error
        }
    }

    /// Online grow (reference §4.5): the `resize` message grows the top image, then the table is
    /// reloaded with the new length.
    public func grow(_ device: String, sizeSectors: UInt64) throws(DeviceError) {
        let name = try Self.dmName(device)
        let f = try changeable(name)
        guard sizeSectors >= f.length else { throw .cannotShrink(fromSectors: f.length, toSectors: sizeSectors) }
        guard sizeSectors > f.length else { return }
        guard !f.readOnly else { throw .readOnly(device) }
        let cs = UInt64(f.status.clusterSectors)
        guard sizeSectors % cs == 0 else { throw .notClusterMultiple(bytes: sizeSectors * 512, clusterBytes: Int(cs) * 512) }
        guard sizeSectors <= PloopSpec.maxImageSectors else { throw .sizeTooLarge(sectors: sizeSectors, limit: PloopSpec.maxImageSectors) }
        let levels = try self.levels(f)
        _ = try message(name, .resize(sectors: sizeSectors))
        try reload(f, paths: levels.map(\.path), length: sizeSectors, raw: levels.first?.format == .raw) {}
    }

    // MARK: - Merges

    /// Online merge of read-only levels (reference §4.4, lower range): user space copies their
    /// clusters into level l1's file while the device runs (clusters a growing l1 moves are told
    /// with `update_delta_index` before their old place is reused), then each merged level leaves
    /// with `notify_merged_backward`. The top is not merged here yet: dm-ploop's `merge` copies
    /// the level below up into the top, the opposite direction of the legacy driver's, and the
    /// disk commands expect the legacy one.
    public func merge(_ device: String, levels range: ClosedRange<Int>, progress: (@Sendable (Int, Int) -> Void)?) throws(DeviceError) -> [String] {
        let name = try Self.dmName(device)
        let f = try changeable(name)
        let levels = try self.levels(f)
        let top = levels.count - 1
        guard range.lowerBound >= 0, range.upperBound <= top, range.lowerBound < range.upperBound else {
            throw .levelsOutOfRange(range, top: top)
        }
        if range.upperBound == top {
            // The levels below the top first (into l1), then the top into l1.
            var removed: [String] = []
            if range.lowerBound < top - 1 { removed = try merge(device, levels: range.lowerBound...(top - 1), progress: progress) }
            let now = try changeable(name)
            return removed + (try mergeTop(now, try self.levels(now), progress: progress))
        }
        let l1 = range.lowerBound
        let dest = levels[l1]
        let sources = levels[(l1 + 1)...range.upperBound].map(\.path)
        var indexFailure: DeviceError?
        do {
            let images = try sources.reversed().map { (p) throws(ImageError) in try Ploop1Image(file: try ImagePath.open(p, write: false), writable: false) }
            let destFile = try ImagePath.open(dest.path, write: true)
            let destination: MergeDestination
            if dest.format == .raw {
                destination = .raw(RawImage(file: destFile, clusterBytes: f.status.clusterSectors * 512))
            } else {
                destination = .ploop1(try Ploop1Image(file: destFile, writable: true))
            }
            _ = try Offline.merge(sources: images, into: destination, progress: progress.map { p in { p($0, $1) } }) { (cluster, block) throws(ImageError) in
                do throws(DeviceError) {
                    try self.updateIndex(device, level: l1, maps: [IndexMap(cluster: UInt32(cluster.value), block: block.value)])
                } catch {
                    indexFailure = error
                    throw .io(SystemError("update_delta_index", path: device, errno: EIO))
                }
            }
            if case .ploop1(let d) = destination { try d.close() }
        } catch {
            throw indexFailure ?? .image(error)
        }
        // Each merged level leaves; the next one down to l1 + 1 takes its place.
        for _ in sources { try deleteDelta(device, level: l1 + 1) }
        return sources
    }

    /// Online merge of the top into the level below, as the original's 9.x merges a stack of two
    /// (reference §4.4, "reverse merge"), whatever the depth: the file below survives, as on the
    /// legacy driver, so the disk commands and their crash recovery read the same on both. (With
    /// three or more deltas the original sends a bare `merge` instead, which copies the level below
    /// up into the top's file and deletes the file below.) The sequence: the file below grown to
    /// the device's size (moves told with `update_delta_index`) and marked in use (it becomes the
    /// top); a table with both upper files writable; `set_noresume 1`; suspend; every entry of the
    /// file below that the top shadows dropped (its block punched); `flip_upper_deltas`;
    /// `set_noresume 0`; the old top's mark cleared; resume; `merge`, which copies the old top's
    /// clusters up into the file that is now the top.
    func mergeTop(_ f: Found, _ levels: [LevelInfo], progress: (@Sendable (Int, Int) -> Void)?) throws(DeviceError) -> [String] {
        let name = f.name
        let top = levels.count - 1
        guard top >= 1 else { throw .levelsOutOfRange(0...0, top: top) }
        guard !f.readOnly else { throw .readOnly(DMPloop.node(named: name)) }
        let lower = levels[top - 1], old = levels[top]
        guard lower.format == .ploop1 else {
            throw .notSupported("merging the top into a raw base online: dm-ploop's flip_upper_deltas refuses a raw lower delta (EBADSLT): unmount the disk and merge offline")
        }
        // The file below becomes writable: no other device may read it meanwhile (a read-only
        // mount of the snapshot it holds).
        let lowerID = PathInfo.identity(lower.path)
        for other in try list() where other.device != DMPloop.node(named: name) {
            if other.levels.contains(where: { PathInfo.identity($0.path) == lowerID }) {
                throw .deviceInUse("\(lower.path) (read by \(other.device): unmount that device before merging into the file)")
            }
        }
        progress?(0, 1)
        // A run killed between its set_noresume 1 and 0 left the flag on: no resume would work.
        if f.status.flags.contains("n") { do { _ = try message(name, .setNoResume(false)) } catch .system(_, errno: EBUSY) {} }
        try growLower(name, level: top - 1, path: lower.path, to: f.length)
        try Self.setInUse(lower.path, true)
        var suspended = false, noResume = false, flipped = false, marked = false
        do {
            try reload(f, paths: levels.map(\.path), length: f.length, raw: levels[0].format == .raw, writable: 2) {}
            do { _ = try message(name, .setNoResume(true)) } catch .system(_, errno: EBUSY) {}
            noResume = true
            try suspend(name)
            suspended = true
            try Self.dropShadowed(lower.path, under: old.path)
            // Written after the drop (before it, the old top's copies are the newer ones) and
            // before the flip (after it, the file below's may be): see `reverseMergeMarker`.
            try Self.markReverseMerge(lower.path)
            marked = true
            _ = try message(name, .flipUpperDeltas)
            flipped = true
            _ = try message(name, .setNoResume(false))
            noResume = false
            if old.format == .ploop1 { try Self.setInUse(old.path, false) }
            try resume(name)
            suspended = false
        } catch {
            // Back to running on the old top (its mark set again), unless the flip happened: then
            // the file below is already the target's top and keeps its mark.
            if noResume { _ = try? message(name, .setNoResume(false)) }
            if suspended { try? resume(name) }
            if !flipped {
                if old.format == .ploop1 { try? Self.setInUse(old.path, true) }
                try? Self.setInUse(lower.path, false)
                // The old top serves again: its copies are the newer ones again.
                if marked { PathInfo.removeRegularFile(Offline.reverseMergeMarker(of: lower.path)) }
            }
            throw error
        }
        _ = try message(name, .merge)
        PathInfo.removeRegularFile(Offline.reverseMergeMarker(of: lower.path))
        progress?(1, 1)
        return [old.path]
    }

    static func markReverseMerge(_ lower: String) throws(DeviceError) {
        do throws(PathInfo.PublishError) { try PathInfo.writeAtomically([], to: Offline.reverseMergeMarker(of: lower), replace: true) } catch {
            throw .system("writing \(Offline.reverseMergeMarker(of: lower)): \(error)", errno: EIO)
        }
    }

    /// The rest of a reverse merge that stopped after its flip (the disk's journal found the
    /// device running its old chain with the two upper files swapped): the flag off, the device
    /// resumed, the old top's mark cleared, then `merge`.
    public func finishSwappedMerge(_ device: String) throws(DeviceError) -> [String] {
        let name = try Self.dmName(device)
        let f = try changeable(name)
        let levels = try self.levels(f)
        guard levels.count >= 2 else { throw .levelsOutOfRange(0...0, top: levels.count - 1) }
        let old = levels[levels.count - 2]
        if f.status.flags.contains("n") { do { _ = try message(name, .setNoResume(false)) } catch .system(_, errno: EBUSY) {} }
        try resume(name)
        if old.format == .ploop1 { try Self.setInUse(old.path, false) }
        _ = try message(name, .merge)
        PathInfo.removeRegularFile(Offline.reverseMergeMarker(of: levels[levels.count - 1].path))
        return [old.path]
    }

    /// grow_lower_delta: the file of `level` grown to `sectors` if it is smaller, with each data
    /// cluster its bigger BAT displaces moved and told to the target before its old place is reused.
    func growLower(_ name: String, level: Int, path: String, to sectors: UInt64) throws(DeviceError) {
        var told: DeviceError?
        do {
            let image = try Ploop1Image(file: try ImagePath.open(path, write: true), writable: true, allowDirty: true, markInUse: false)
            guard image.header.sizeInSectors < sectors else { return }
            try image.setInUse(true)
            try image.grow(toSectors: sectors, relocated: { (cluster, block) throws(ImageError) in
                do throws(DeviceError) {
                    _ = try self.message(name, .updateDeltaIndex(level: level, map: [(UInt32(cluster.value), block.value)]))
                } catch {
                    told = error
                    throw .io(SystemError("update_delta_index", path: path, errno: EIO))
                }
            })
            try image.close()
        } catch {
            throw told ?? .image(error)
        }
    }

    /// zero_base_delta: drops every entry of `lower` that `top` also maps (the top's cluster wins),
    /// synced before the blocks they pointed at are punched, so the two files map no cluster twice
    /// and `flip_upper_deltas` may swap them.
    static func dropShadowed(_ lower: String, under top: String) throws(DeviceError) {
        try lifting { () throws(ImageError) in
            let upper = try Ploop1Image(file: try ImagePath.open(top, write: false), writable: false, allowDirty: true)
            let image = try Ploop1Image(file: try ImagePath.open(lower, write: true), writable: true, allowDirty: true, markInUse: false)
            var freed: [ImageBlock] = []
            for (c, _) in upper.allocatedClusters() {
                guard let b = image.block(of: c) else { continue }
                try image.setEntry(c, to: nil)
                freed.append(b)
            }
            guard !freed.isEmpty else { return }
            try image.flush()
            for b in freed { try image.punch(block: b, offset: 0, length: image.clusterBytes) }
            try image.flush()
        }
    }

    /// `notify_merged_backward L`: level L's clusters are in level L−1's file; the kernel re-reads
    /// L−1 and lets L go.
    public func deleteDelta(_ device: String, level: Int) throws(DeviceError) {
        _ = try message(try Self.dmName(device), .notifyMergedBackward(level: level))
    }

    /// `update_delta_index L c:d;…`: clusters of level L moved in its file.
    public func updateIndex(_ device: String, level: Int, maps: [IndexMap]) throws(DeviceError) {
        _ = try message(try Self.dmName(device), .updateDeltaIndex(level: level, map: maps.map { ($0.cluster, $0.block) }))
    }

    // MARK: - Write tracking (the tracking target)

    /// What a copy in this process has asked of device `name`: the top it reads and the file
    /// ranges of dirty clusters not handed out yet.
    struct TrackState {
        var top: String
        /// The top file, open for the copy's whole run (its BAT entries are read per dirty cluster).
        var topFile: PosixBlockFile
        var header: ImageHeader?
        var clusterBytes: UInt64
        var pending: [Range<UInt64>] = []
    }
    let tracks = Mutex<[String: TrackState]>([:])

    /// Copy with write tracking as the original's 9.x sets it up (reference §4.6): the device
    /// suspended, an `error` table loaded on it, a second ploop device `<name>.tracking` made on
    /// fresh descriptors of the same images, a `tracking` table over that one loaded on the device,
    /// resumed; then `tracking_start`. Returns the top file's length: the copy reads the file, as
    /// with the legacy driver. On failure the ploop table goes back on the device.
    public func trackInit(_ device: String) throws(DeviceError) -> UInt64 {
        let name = try Self.dmName(device)
        let twin = name + DMPloop.trackingSuffix
        let f = try changeable(name)
        // A twin left by a copy that died is not running this device any more: it goes first.
        if try devices().contains(where: { $0.name == twin }) { _ = try? send(DM.Request(.devRemove, name: twin), what: "removing \(twin)") }
        let levels = try self.levels(f)
        guard let top = levels.last else { throw .noSuchDevice(device) }
        let raw = levels[0].format == .raw
        let paths = levels.map(\.path)
        var made = false
        do {
            try suspend(name)
            _ = try send(DM.Request(.tableLoad, name: name, flags: f.readOnly ? .readOnly : [], targets: [DM.Target(length: f.length, type: "error", params: "")]), what: "loading an error table on \(name)")
            let fds = try Self.openDeltas(paths, writable: f.readOnly ? 0 : 1)
            defer { for fd in fds { close(fd) } }
            _ = try send(DM.Request(.devCreate, name: twin), what: "creating \(twin)")
            made = true
            let table = DMPloop.Table(clusterLog: DMPloop.Table.clusterLog(sectors: UInt32(f.status.clusterSectors)), fds: fds, rawBase: raw)
            _ = try send(DM.Request(.tableLoad, name: twin, flags: f.readOnly ? .readOnly : [], targets: [DM.Target(length: f.length, type: DMPloop.targetType, params: table.params)]), what: "loading the ploop table of \(twin)")
            try resume(twin)
            let tracking = "\(f.status.clusterSectors) /dev/mapper/\(twin)"
            _ = try send(DM.Request(.tableLoad, name: name, flags: f.readOnly ? .readOnly : [], targets: [DM.Target(length: f.length, type: DMPloop.trackingType, params: tracking)]), what: "loading the tracking table of \(name)")
            try resume(name)
            _ = try message(name, .trackingStart)
        } catch {
            // Back to the ploop table (the device is resumed whatever happens), the twin gone.
            try? reload(f, paths: paths, length: f.length, raw: raw) {}
            if made { _ = try? send(DM.Request(.devRemove, name: twin), what: "removing \(twin)") }
            throw error
        }
        var header: ImageHeader?
        let end: UInt64
        let file: PosixBlockFile
        do throws(ImageError) {
            file = try ImagePath.open(top.path, write: false)
            if top.format == .ploop1 {
                let bytes = try file.readBytes(PloopSpec.headerSize, at: 0)
                do throws(FormatError) { header = try ImageHeader.decode(bytes) } catch { throw .format(top.path, error) }
            }
            end = try file.size()
        } catch {
            try? untrack(name)
            throw .image(error)
        }
        tracks.withLock { $0[name] = TrackState(top: top.path, topFile: file, header: header, clusterBytes: UInt64(f.status.clusterSectors) * 512) }
        return end
    }

    /// The tracking target marks the whole device from `tracking_start`: nothing to move.
    public func trackSetPosition(_ device: String, _ position: UInt64) throws(DeviceError) {
        guard tracks.withLock({ $0[(try? Self.dmName(device)) ?? ""] }) != nil else { throw .wrongState(.tracking, .off) }
    }

    /// The next dirty range of the top file: for each cluster `tracking_get_next` hands out, the
    /// block the top's BAT maps it to (read from the file as it is now) and the BAT sector with
    /// its entry; nil when the target has nothing left this pass.
    public func trackRead(_ device: String) throws(DeviceError) -> Range<UInt64>? {
        let name = try Self.dmName(device)
        while true {
            guard let st = tracks.withLock({ $0[name] }) else { throw .wrongState(.tracking, .off) }
            if let r = st.pending.first {
                tracks.withLock { _ = $0[name]?.pending.removeFirst() }
                return r
            }
            guard try takeNext(name, st) else { return nil }
        }
    }

    /// Asks the target for its next dirty cluster and queues its file ranges; false when none.
    func takeNext(_ name: String, _ st: TrackState) throws(DeviceError) -> Bool {
        guard let reply = try message(name, .trackingGetNext)?.trimmingCharacters(in: .whitespacesAndNewlines), !reply.isEmpty else { return false }
        guard let c = UInt64(reply) else { throw .invalid("Not valid tracking offset \(reply)") }
        var ranges: [Range<UInt64>] = []
        if let h = st.header {
            let at = h.layout.entryOffset(ClusterIndex(c))
            func entry() throws(DeviceError) -> UInt32 {
                do throws(ImageError) {
                    let bytes = try st.topFile.readBytes(4, at: at)
                    return bytes.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }.littleEndian
                } catch { throw .image(error) }
            }
            var e = try entry()
            // A cluster written but not mapped in the file yet: its entry is there after a flush.
            if e == 0 {
                try sync(DMPloop.node(named: name))
                e = try entry()
            }
            if e != 0, let b = try? h.layout.decode(e) {
                ranges.append(UInt64(b.value) * st.clusterBytes..<UInt64(b.value + 1) * st.clusterBytes)
            }
            ranges.append(at / 512 * 512..<at / 512 * 512 + 512)
        } else {
            ranges.append(c * st.clusterBytes..<(c + 1) * st.clusterBytes)
        }
        tracks.withLock { $0[name]?.pending = ranges }
        return true
    }

    /// `tracking_stop` and the ploop table back; refused while the target still has dirty
    /// clusters the copy has not read (as the legacy TRACK_STOP is).
    public func trackStop(_ device: String) throws(DeviceError) {
        let name = try Self.dmName(device)
        guard let st = tracks.withLock({ $0[name] }) else { throw .wrongState(.tracking, .off) }
        if !st.pending.isEmpty { throw .unreadExtents }
        if try takeNext(name, st) { throw .unreadExtents }
        _ = try message(name, .trackingStop)
        try untrack(name)
    }

    public func trackAbort(_ device: String) throws(DeviceError) {
        let name = try Self.dmName(device)
        _ = try? message(name, .trackingStop)
        try untrack(name)
    }

    /// Ends tracking of device `name` (reference §4.6, `ploop_tg_deinit`): it and its twin
    /// suspended, a ploop table of the twin's images loaded on it, resumed, the twin removed.
    func untrack(_ name: String) throws(DeviceError) {
        tracks.withLock { $0[name] = nil }
        let twin = name + DMPloop.trackingSuffix
        guard let inner = try ploop(twin) else { return }
        let levels = try self.levels(inner)
        var outer = inner
        outer.name = name
        try reload(outer, paths: levels.map(\.path), length: inner.length, raw: levels.first?.format == .raw) { () throws(DeviceError) in
            try suspend(twin)
        }
        _ = try send(DM.Request(.devRemove, name: twin), what: "removing \(twin)")
    }


    /// dm-ploop has no SYNC: a suspend flushes; here the device's I/O flushes.
    public func sync(_ device: String) throws(DeviceError) { try openIO(device).flush() }


    public var balloonIoctls: Bool { false }

    static let noBalloon = DeviceError.notSupported("dm-ploop has no balloon ioctls: the original's 9.x keeps only 'balloon show', 'change' and 'discard', as file operations")
    /// Only the query (no inflate, state kept): the state, OFF or TRACK (a copy runs).
    public func balloon(_ device: String, inflate: Bool, keepIntact: Bool) throws(DeviceError) -> BalloonReply {
        guard !inflate && keepIntact else { throw Self.noBalloon }
        let i = try info(device)
        return BalloonReply(state: i.state, allocHead: 0, level: i.levels.count - 1)
    }
    public func loadFreeBlocks(_ device: String, level: Int, extents: [FreeExtent]) throws(DeviceError) -> UInt32 { throw Self.noBalloon }
    public func freeBlockList(_ device: String) throws(DeviceError) -> [FreeExtent] { throw Self.noBalloon }
    public func filterFreeBlocks(_ device: String, minLength: UInt32) throws(DeviceError) { throw Self.noBalloon }
    public func dropFreeBlocks(_ device: String) throws(DeviceError) { throw Self.noBalloon }
    public func relocateBlocks(_ device: String, level: Int, allocHead: UInt32, extents: [RelocExtent]) throws(DeviceError) -> UInt32 { throw Self.noBalloon }


}
