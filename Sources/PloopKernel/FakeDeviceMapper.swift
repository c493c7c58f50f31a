import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopSystem
import Synchronization

/// Where the dm-ploop backend's device-mapper ioctls go: `/dev/mapper/control` on a host, or a
/// fake in tests that decodes the same bytes.
public protocol DMTransport: Sendable {
    /// One ioctl on the control node with `buffer` as the `struct dm_ioctl` argument, read and
    /// written in place: 0 or -errno. Throws only when device-mapper cannot be reached at all.
    func ioctl(_ request: UInt, _ buffer: inout [UInt8]) throws(DeviceError) -> Int32
}

/// The host's device-mapper.
public struct SystemDMTransport: DMTransport {
    public let control: String
    public init(control: String = "/dev/mapper/control") { self.control = control }

    public func ioctl(_ request: UInt, _ buffer: inout [UInt8]) throws(DeviceError) -> Int32 {
        let node: File
        do { node = try File(path: control, mode: .readWrite) } catch {
            switch error.errno {
            case ENOENT, ENXIO, ENODEV:
                throw .unavailable("\(control): no device-mapper here (\(SystemError.words(error.errno))): load dm-mod, or use --backend simulator")
            case EACCES, EPERM:
                throw .unavailable("\(control): permission denied: the device-mapper backend needs root on the host")
            default:
                throw .system("open \(control)", errno: error.errno)
            }
        }
        return buffer.withUnsafeMutableBytes { node.control(request, $0.baseAddress) }
    }
}

/// A stand-in for the kernel's device-mapper with the dm-ploop target, for hosts without it. It
/// decodes each request at the offsets of `linux/dm-ioctl.h` written out here (not through the
/// backend's `DM.Layout`, so a layout slip on either side shows), keeps devices with a live and an
/// inactive table, suspend state, open counts and event numbers as device-mapper does, and checks
/// a ploop table as the target's constructor does (reference dm-ploop.md §1.5), reading the image
/// headers through the descriptors the table names, which it duplicates as the kernel takes its
/// own reference.
///
/// A live ploop table's I/O is served one of two ways:
/// - in this process (`init()`): a `DeviceModel` over the images, opened by path when the table
///   goes live and flushed on suspend, which leaves the in-use mark to user space as dm-ploop does;
/// - by another backend's device (`init(lower:stateDirectory:)`, the simulator's): the fake's
///   state lives in files under `stateDirectory`, so every process sees the same device-mapper
///   (the CLI run with `PLOOP_DM_FAKE=simulator`), and `/dev/mapper/<name>` is a node of the lower
///   device. A table reload becomes what the lower backend does: a chain one delta longer is its
///   snapshot (it makes the empty delta itself, in place of the one user space made), a longer
///   length its grow; other swaps are refused (EINVAL).
///
/// It models the device lifecycle, listing, status, `get_img_name`, `set_noresume`, `resize`,
/// `notify_merged_backward`, `update_delta_index`, `flip_upper_deltas` (with the debug build's
/// EEXIST check: no cluster of the top may be mapped in the lower delta's file) and `merge` after
/// a flip (the reverse merge: the old top's clusters go up into the file that is now the top).
/// The tracking target (`tracking_start|stop|clear|get_next`, reference §2.3) over a ploop device
/// fills its bitmap from what that device's own write tracking saw. Not yet: `merge` without a
/// flip (EOPNOTSUPP here).
public final class FakeDeviceMapper: DMTransport {
    /// ENOTSUPP, the kernel-internal errno dm-ploop answers unknown messages with.
    public static let enotsupp: Int32 = 524

    struct Target: Codable, Equatable {
        var start: UInt64
        var length: UInt64
        var type: String
        var params: String
    }

    struct Table: Codable {
        var targets: [Target]
        var readOnly: Bool
        /// ploop: the files of the deltas, base first, and which were given writable.
        var paths: [String] = []
        var writable: [Bool] = []
        var clusterSectors = 0
        var fallocNewCluster = false
        var rawBase = false
        /// `flip_upper_deltas` swapped the two upper levels: the target's top is `paths[top − 1]`
        /// until the `merge` that follows.
        var flipped = false
        /// ploop, in this process: our duplicates of the table's descriptors, base first.
        var fds: [Int32] = []
        /// The ploop target's I/O in this process, from the moment the table goes live.
        var model: DeviceModel?

        enum CodingKeys: String, CodingKey { case targets, readOnly, paths, writable, clusterSectors, fallocNewCluster, rawBase, flipped }

        var isPloop: Bool { targets.first?.type == DMPloop.targetType }
        /// A tracking table's origin device (its dm name) and cluster size in sectors.
        var trackingOrigin: (name: String, clusterSectors: UInt64)? {
            guard let t = targets.first, t.type == "tracking" else { return nil }
            let w = t.params.split(separator: " ")
            guard w.count == 2, let cs = UInt64(w[0]) else { return nil }
            return (String(w[1].split(separator: "/").last ?? ""), cs)
        }
        /// The files as the target numbers its levels.
        var levels: [String] {
            guard flipped, paths.count >= 2 else { return paths }
            var l = paths
            l.swapAt(l.count - 1, l.count - 2)
            return l
        }
    }

    struct Device: Codable {
        var name: String
        var minor: UInt32
        var live: Table?
        var inactive: Table?
        var suspended = false
        var noResume = false
        var openCount: Int32 = 0
        var eventNumber: UInt32 = 0
        /// Shared mode: the lower backend's device that serves the live ploop table.
        var lowerDevice: String?
        /// A live tracking table's bitmap, once `tracking_start` came: the dirty device clusters
        /// and the cursor `tracking_get_next` goes on from.
        var tracking: Tracking?
    }

    struct Tracking: Codable {
        var dirty: Set<UInt64> = []
        var cursor: UInt64 = 0
    }

    /// The shared mode's state file.
    struct Saved: Codable {
        var devices: [String: Device]
        /// Whether the fake made the node directory (it removes it again when the last device goes).
        var madeNodeDirectory: Bool
    }

    /// The shared mode: the lower backend and where the state and the nodes live.
    struct Shared {
        let lower: any DeviceBackend
        let directory: String
        let nodeDirectory: String
        var stateFile: String { directory + "/devices.json" }
        var lockFile: String { directory + "/lock" }
    }

    public static let major: UInt32 = 253
    /// The target types this fake has registered (DM_LIST_VERSIONS).
    static let targetTypes: [(String, (UInt32, UInt32, UInt32))] = [("ploop", (1, 0, 0)), ("tracking", (1, 0, 0)), ("linear", (1, 4, 0)), ("zero", (1, 2, 0)), ("error", (1, 6, 0))]
    private let devices = Mutex<[String: Device]>([:])
    private let madeNodeDirectory = Mutex(false)
    let shared: Shared?
    /// One request at a time in shared mode (between processes the state file's lock).
    private let serial = Mutex(())
    /// Every command decoded, in order (tests read it).
    public let commands = Mutex<[(DM.Command, String)]>([])
    /// Every table line loaded (`start length type params`) and every message, in order.
    public let texts = Mutex<[String]>([])

    /// Devices served in this process.
    public init() { shared = nil }

    /// Devices served by `lower`'s devices, the state kept under `stateDirectory` (made if
    /// missing), device nodes in `nodeDirectory`.
    public init(lower: any DeviceBackend, stateDirectory: String, nodeDirectory: String = "/dev/mapper") {
        shared = Shared(lower: lower, directory: stateDirectory, nodeDirectory: nodeDirectory)
    }

    deinit {
        guard shared == nil else { return }
        devices.withLock { all in
            for d in all.values { Self.release(d.live); Self.release(d.inactive) }
        }
    }

    static func release(_ t: Table?) {
        try? t?.model?.stop()
        for fd in t?.fds ?? [] { close(fd) }
    }

    /// Block I/O on device `name`: like the device node, it follows the table that is live at
    /// each request (a reload swaps the table under it).
    public func openIO(_ name: String) throws(DeviceError) -> any DeviceIO {
        if let sh = shared {
            let dev = try locked { () throws(DeviceError) -> String? in
                devices.withLock { all in all[name]?.live?.trackingOrigin.flatMap { all[$0.name]?.lowerDevice } ?? all[name]?.lowerDevice }
            }
            guard let dev else { throw .noSuchDevice("/dev/mapper/\(name)") }
            return try sh.lower.openIO(dev)
        }
        _ = try liveModel(name)
        return LiveIO(fake: self, name: name)
    }

    /// Requests hold this shared; a table swap holds it alone, so none is in flight meanwhile.
    let ioGate = ReadWriteLock(())

    func liveModel(_ name: String) throws(DeviceError) -> DeviceModel {
        let m = devices.withLock { all -> DeviceModel? in
            guard let live = all[name]?.live else { return nil }
            // A tracking table passes I/O to its origin.
            if let o = live.trackingOrigin { return all[o.name]?.live?.model }
            return live.model
        }
        guard let m else { throw .noSuchDevice("/dev/mapper/\(name)") }
        return m
    }

    struct LiveIO: DeviceIO {
        let fake: FakeDeviceMapper
        let name: String
        func on<T>(_ body: (DeviceModel) throws(DeviceError) -> T) throws(DeviceError) -> T {
            try fake.ioGate.read { _ throws(DeviceError) -> T in try body(try fake.liveModel(name)) }
        }
        var sizeBytes: UInt64 { get throws(DeviceError) { try on { $0.sizeBytes } } }
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) { try on { m throws(DeviceError) in try m.read(into: buffer, at: offset) } }
        func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DeviceError) { try on { m throws(DeviceError) in try m.write(buffer, at: offset) } }
        func flush() throws(DeviceError) { try on { m throws(DeviceError) in try m.flush() } }
        func discard(at offset: UInt64, length: UInt64) throws(DeviceError) { try on { m throws(DeviceError) in try m.writeZeroes(at: offset, length: length) } }
    }

    private let failures = Mutex<[DM.Command: Int32]>([:])

    /// The next `command` fails with `errno` (fault injection for tests of the undo paths).
    public func fail(_ command: DM.Command, errno: Int32) {
        failures.withLock { $0[command] = errno }
    }

    private let messageFailures = Mutex<[(String, Int32)]>([])

    /// The next message whose verb is `verb` fails with `errno`, before it does anything.
    public func failMessage(_ verb: String, errno: Int32) {
        messageFailures.withLock { $0.append((verb, errno)) }
    }

    /// Holds device `name` open (as a mounted file system would), so removing it is refused.
    public func hold(_ name: String, _ delta: Int32) {
        devices.withLock { $0[name]?.openCount += delta }
    }

    // MARK: - Decoding (offsets of struct dm_ioctl, x86-64)

    enum Off {
        static let version = 0, dataSize = 12, dataStart = 16, targetCount = 20, openCount = 24, flags = 28
        static let eventNumber = 32, dev = 40, name = 48, nameBytes = 128, header = 312
        // struct dm_target_spec
        static let specStart = 0, specLength = 8, specStatus = 16, specNext = 20, specType = 24, spec = 40
    }

    static func u32(_ b: [UInt8], _ o: Int) -> UInt32 { o + 4 <= b.count ? (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * $1) } : 0 }
    static func u64(_ b: [UInt8], _ o: Int) -> UInt64 { UInt64(u32(b, o)) | UInt64(u32(b, o + 4)) << 32 }
    static func set32(_ b: inout [UInt8], _ v: UInt32, _ o: Int) { for i in 0..<4 { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
    static func set64(_ b: inout [UInt8], _ v: UInt64, _ o: Int) { for i in 0..<8 { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
    static func string(_ b: [UInt8], _ o: Int, max: Int) -> String {
        let end = min(o + max, b.count)
        guard o < end else { return "" }
        return String(decoding: b[o..<end].prefix { $0 != 0 }, as: UTF8.self)
    }

    struct Failure: Error { let errno: Int32 }

    public func ioctl(_ request: UInt, _ b: inout [UInt8]) throws(DeviceError) -> Int32 {
        // _IOWR(0xfd, nr, 312 bytes)
        guard request & 0xFFFF_FF00 == 0xC138_FD00, let cmd = DM.Command(rawValue: Int32(request & 0xff)) else { return -ENOTTY }
        guard b.count >= Off.header, Self.u32(b, Off.version) == 4, Int(Self.u32(b, Off.dataSize)) <= b.count,
            Self.u32(b, Off.dataSize) >= UInt32(Off.header)
        else { return -EINVAL }
        let name = Self.string(b, Off.name, max: Off.nameBytes)
        commands.withLock { $0.append((cmd, name)) }
        if let e = failures.withLock({ $0.removeValue(forKey: cmd) }) { return -e }
        return try locked { () throws(DeviceError) -> Int32 in
            do throws(Failure) {
                try perform(cmd, name, &b)
                return 0
            } catch {
                return -error.errno
            }
        }
    }

    /// Runs `body` as one request: in shared mode under the state file's lock, with the devices
    /// read from it before and written back after (atomically: a process killed meanwhile leaves
    /// the state of the request before, as a kernel would).
    func locked<T>(_ body: () throws(DeviceError) -> T) throws(DeviceError) -> T {
        guard let sh = shared else { return try body() }
        return try serial.withLock { _ throws(DeviceError) -> T in
            do { try FileManager.default.createDirectory(atPath: sh.directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700]) } catch {
                throw .system("creating \(sh.directory)", errno: EACCES)
            }
            let lock: File
            do throws(SystemError) { lock = try File(path: sh.lockFile, mode: .createOrOpen) } catch { throw .system(sh.lockFile, errno: error.errno) }
            while (try? lock.tryLock(.exclusive)) != true { Host.pause(milliseconds: 5) }
            defer { lock.unlock() }
            let saved = (try? Data(contentsOf: URL(fileURLWithPath: sh.stateFile))).flatMap { try? JSONDecoder().decode(Saved.self, from: $0) }
            devices.withLock { $0 = saved?.devices ?? [:] }
            madeNodeDirectory.withLock { $0 = saved?.madeNodeDirectory ?? false }
            let result = try body()
            let now = Saved(devices: devices.withLock { $0 }, madeNodeDirectory: madeNodeDirectory.withLock { $0 })
            do {
                let enc = JSONEncoder()
                enc.outputFormatting = [.sortedKeys, .prettyPrinted]
                try enc.encode(now).write(to: URL(fileURLWithPath: sh.stateFile), options: .atomic)
            } catch { throw .system("writing \(sh.stateFile)", errno: EIO) }
            return result
        }
    }

    private func perform(_ cmd: DM.Command, _ name: String, _ b: inout [UInt8]) throws(Failure) {
        let flags = Self.u32(b, Off.flags)
        // The answer's flags start from the request's, minus what the kernel sets itself.
        Self.set32(&b, flags & ~(DM.Flags.bufferFull.rawValue | DM.Flags.dataOut.rawValue), Off.flags)
        switch cmd {
        case .version:
            Self.set32(&b, 4, Off.version); Self.set32(&b, 47, Off.version + 4); Self.set32(&b, 0, Off.version + 8)
        case .devCreate:
            guard !name.isEmpty else { throw Failure(errno: EINVAL) }
            try devices.withLock { all throws(Failure) in
                guard all[name] == nil else { throw Failure(errno: EBUSY) }
                let minor: UInt32
                if flags & DM.Flags.persistentDevice.rawValue != 0 {
                    let (maj, m) = DM.decodeDev(Self.u64(b, Off.dev))
                    guard maj == Self.major else { throw Failure(errno: EINVAL) }
                    guard !all.values.contains(where: { $0.minor == m }) else { throw Failure(errno: EBUSY) }
                    minor = m
                } else {
                    minor = (0...).lazy.map(UInt32.init).first { m in !all.values.contains { $0.minor == m } }!
                }
                all[name] = Device(name: name, minor: minor)
                Self.info(all[name]!, &b)
            }
        case .tableLoad:
            var table = try load(b, readOnly: flags & DM.Flags.readOnly.rawValue != 0)
            // Shared mode keeps files by name: the descriptors die with the process that loaded.
            if shared != nil {
                for fd in table.fds { close(fd) }
                table.fds = []
            }
            try devices.withLock { all throws(Failure) in
                guard all[name] != nil else { Self.release(table); throw Failure(errno: ENXIO) }
                Self.release(all[name]!.inactive)
                all[name]!.inactive = table
                Self.info(all[name]!, &b)
            }
        case .tableClear:
            try devices.withLock { all throws(Failure) in
                guard all[name] != nil else { throw Failure(errno: ENXIO) }
                Self.release(all[name]!.inactive)
                all[name]!.inactive = nil
                Self.info(all[name]!, &b)
            }
        case .devSuspend:
            // No request is in flight while a device suspends or its tables change places (the
            // gate first, then the devices: the order requests take them in).
            try ioGate.write { _ throws(Failure) in try devices.withLock { all throws(Failure) in
                guard var d = all[name] else { throw Failure(errno: ENXIO) }
                if flags & DM.Flags.suspend.rawValue != 0 {
                    // A suspend flushes what the target holds (unless told not to), so a table
                    // loaded next reads the images as they are.
                    if flags & DM.Flags.noFlush.rawValue == 0 {
                        try? d.live?.model?.flush()
                        if let sh = shared, let dev = d.lowerDevice { try? sh.lower.sync(dev) }
                    }
                    d.suspended = true
                } else {
                    if d.noResume && d.suspended { throw Failure(errno: EAGAIN) }
                    if var t = d.inactive {
                        do throws(Failure) {
                            if shared != nil {
                                try swapLower(&d, to: t, &all)
                            } else {
                                Self.release(d.live)
                                if t.isPloop { t.model = try Self.model(t) }
                            }
                        } catch {
                            // The old table is gone (in this process) or still serves (shared).
                            if shared == nil { d.live = nil }
                            d.inactive = nil
                            all[name] = d
                            Self.release(t)
                            throw error
                        }
                        d.live = t
                        d.inactive = nil
                        d.eventNumber += 1
                    }
                    d.suspended = false
                }
                all[name] = d
                Self.info(d, &b)
            } }
        case .devRemove:
            try devices.withLock { all throws(Failure) in
                guard let d = all[name] else { throw Failure(errno: ENXIO) }
                guard d.openCount == 0 else { throw Failure(errno: EBUSY) }
                if let sh = shared {
                    if let dev = d.lowerDevice {
                        do throws(DeviceError) { try sh.lower.umount(dev) } catch { throw Failure(errno: Self.errnoOf(error)) }
                    }
                    removeNode(name, all.count == 1)
                }
                Self.release(d.live)
                Self.release(d.inactive)
                all[name] = nil
            }
        case .devStatus:
            try devices.withLock { all throws(Failure) in
                guard let d = all[name] else { throw Failure(errno: ENXIO) }
                Self.info(d, &b)
            }
        case .listDevices:
            let all = devices.withLock { $0.values.sorted { $0.minor < $1.minor } }
            var out: [UInt8] = []
            for (i, d) in all.enumerated() {
                var e = [UInt8](repeating: 0, count: 12)
                Self.set64(&e, DM.encodeDev(major: Self.major, minor: d.minor), 0)
                e += Array(d.name.utf8) + [0]
                e += [UInt8](repeating: 0, count: (8 - e.count % 8) % 8)
                Self.set32(&e, i == all.count - 1 ? 0 : UInt32(e.count), 8)
                out += e
            }
            if out.isEmpty { out = [UInt8](repeating: 0, count: 16) }
            Self.answer(out, &b)
        case .listVersions:
            // struct dm_target_versions: next, version[3], name; entries 8-aligned.
            var out: [UInt8] = []
            let types = Self.targetTypes
            for (i, (t, v)) in types.enumerated() {
                var e = [UInt8](repeating: 0, count: 16)
                Self.set32(&e, v.0, 4); Self.set32(&e, v.1, 8); Self.set32(&e, v.2, 12)
                e += Array(t.utf8) + [0]
                e += [UInt8](repeating: 0, count: (8 - e.count % 8) % 8)
                Self.set32(&e, i == types.count - 1 ? 0 : UInt32(e.count), 0)
                out += e
            }
            Self.answer(out, &b)
        case .tableStatus:
            try devices.withLock { all throws(Failure) in
                guard let d = all[name] else { throw Failure(errno: ENXIO) }
                Self.info(d, &b)
                let table = flags & DM.Flags.queryInactiveTable.rawValue != 0 ? d.inactive : d.live
                var out: [UInt8] = []
                for t in table?.targets ?? [] {
                    var spec = [UInt8](repeating: 0, count: Off.spec)
                    Self.set64(&spec, t.start, Off.specStart)
                    Self.set64(&spec, t.length, Off.specLength)
                    spec.replaceSubrange(Off.specType..<Off.specType + min(15, t.type.utf8.count), with: Array(t.type.utf8.prefix(15)))
                    var text = t.type == DMPloop.targetType && table != nil ? Self.ploopStatus(table!, d) : t.params
                    if let o = table?.trackingOrigin {
                        // <origin maj:min> <cluster sectors> active|inactive
                        text = "\(Self.major):\(all[o.name]?.minor ?? 0) \(o.clusterSectors) \(d.tracking == nil ? "inactive" : "active")"
                    }
                    spec += Array(text.utf8) + [0]
                    spec += [UInt8](repeating: 0, count: (8 - spec.count % 8) % 8)
                    // Answering, `next` counts from the first spec.
                    Self.set32(&spec, UInt32(out.count + spec.count), Off.specNext)
                    out += spec
                }
                Self.set32(&b, UInt32(table?.targets.count ?? 0), Off.targetCount)
                Self.answer(out, &b)
            }
        case .targetMessage:
            let start = Int(Self.u32(b, Off.dataStart))
            let text = Self.string(b, start + 8, max: Int(Self.u32(b, Off.dataSize)) - start - 8)
            texts.withLock { $0.append(text) }
            let verb = text.split(separator: " ").first.map(String.init) ?? ""
            if let e = messageFailures.withLock({ f -> Int32? in
                guard let i = f.firstIndex(where: { $0.0 == verb }) else { return nil }
                return f.remove(at: i).1
            }) {
                throw Failure(errno: e)
            }
            let reply = try message(name, text)
            if let r = reply { Self.answer(Array((r + "\n").utf8) + [0], &b, dataOut: true) }
        default:
            throw Failure(errno: ENOTTY)
        }
    }

    /// The in-process I/O of a ploop table going live: a model over its files (by path).
    static func model(_ t: Table) throws(Failure) -> DeviceModel {
        do {
            return try DeviceModel(MountRequest(
                images: t.paths, baseFormat: t.rawBase ? .raw : .ploop1, readOnly: t.readOnly, clusterSectors: UInt32(t.clusterSectors), callerOwnsInUse: true))
        } catch { throw Failure(errno: EIO) }
    }

    // MARK: - Shared mode: tables served by the lower backend

    /// Makes the lower backend serve table `t` in place of `d`'s live one (none: a mount).
    /// The copy-with-tracking sequence (reference §4.6) hands the lower device over: a second
    /// ploop device over the files a suspended one runs takes its lower device, the first keeps
    /// only its node under a tracking table, and gets the lower device back with its ploop table.
    private func swapLower(_ d: inout Device, to t: Table, _ all: inout [String: Device]) throws(Failure) {
        guard let sh = shared else { return }
        func lifted<T>(_ body: () throws(DeviceError) -> T) throws(Failure) -> T {
            do { return try body() } catch { throw Failure(errno: Self.errnoOf(error)) }
        }
        if let o = t.trackingOrigin {
            // Tracking: I/O goes to the origin, which serves this device's files already.
            if let dev = d.lowerDevice, all[o.name]?.lowerDevice == dev { d.lowerDevice = nil }
            return
        }
        if t.isPloop, let o = d.live?.trackingOrigin, let origin = all[o.name], let dev = origin.lowerDevice, origin.live?.paths == t.paths {
            d.lowerDevice = dev
            all[o.name]!.lowerDevice = nil
            return
        }
        if t.isPloop, d.live == nil, let dev = all.values.first(where: { $0.suspended && $0.live?.paths == t.paths && $0.lowerDevice != nil })?.lowerDevice {
            try makeNode(d.name, of: dev)
            d.lowerDevice = dev
            return
        }
        guard let old = d.live, old.isPloop, let dev = d.lowerDevice else {
            guard t.isPloop else { return }
            let dev = try lifted { () throws(DeviceError) in
                try sh.lower.mount(MountRequest(
                    images: t.paths, baseFormat: t.rawBase ? .raw : .ploop1, readOnly: t.readOnly, clusterSectors: UInt32(t.clusterSectors), callerOwnsInUse: true))
            }
            do throws(Failure) { try makeNode(d.name, of: dev) } catch {
                try? sh.lower.umount(dev)
                throw error
            }
            d.lowerDevice = dev
            return
        }
        // What the lower backend can do in place; the rest it cannot serve.
        guard t.isPloop, !old.flipped, t.readOnly == old.readOnly else { throw Failure(errno: EINVAL) }
        let length = t.targets[0].length
        if t.paths == old.paths {
            let size = try lifted { () throws(DeviceError) in try sh.lower.info(dev).sizeBytes / 512 }
            if length > size { try lifted { () throws(DeviceError) in try sh.lower.grow(dev, sizeSectors: length) } }
            return
        }
        guard t.paths.count == old.paths.count + 1, Array(t.paths.dropLast()) == old.paths, length == old.targets[0].length, let new = t.paths.last else {
            throw Failure(errno: EINVAL)
        }
        // A snapshot: the empty delta user space made (checked at load) is made again by the
        // lower device, which takes it into its stack.
        guard let h = try? ImageInfo.read(path: new), h.allocatedClusters == 0 else { throw Failure(errno: EINVAL) }
        PathInfo.remove(new)
        try lifted { () throws(DeviceError) in try sh.lower.snapshot(dev, newDelta: new) }
    }

    /// `/dev/mapper/<name>`: a node of the lower device (the directory made if missing).
    private func makeNode(_ name: String, of dev: String) throws(Failure) {
        guard let sh = shared else { return }
        guard let (major, minor) = BlockNode.numbers(dev) else { throw Failure(errno: ENODEV) }
        if PathInfo.kind(sh.nodeDirectory) == .missing {
            guard (try? FileManager.default.createDirectory(atPath: sh.nodeDirectory, withIntermediateDirectories: false)) != nil else { throw Failure(errno: EACCES) }
            madeNodeDirectory.withLock { $0 = true }
        }
        let node = sh.nodeDirectory + "/" + name
        if PathInfo.entryKind(node) != .missing {
            // Ours from a device that went without us (its lower device stopped): replaced.
            guard BlockNode.numbers(node) != nil else { throw Failure(errno: EEXIST) }
            BlockNode.remove(node)
        }
        do { try BlockNode.make(node, major: major, minor: minor) } catch { throw Failure(errno: error.errno) }
    }

    /// Removes `<name>` and its partition nodes; the directory too when `last` and the fake made it.
    private func removeNode(_ name: String, _ last: Bool) {
        guard let sh = shared else { return }
        let node = sh.nodeDirectory + "/" + name
        if let (major, _) = BlockNode.numbers(node) {
            PartitionNodes.removeNodes(node, major: major)
            BlockNode.remove(node)
        }
        if last, madeNodeDirectory.withLock({ $0 }), Folder.removeEmpty(sh.nodeDirectory) {
            madeNodeDirectory.withLock { $0 = false }
        }
    }

    /// Name, number, flags, open count, event number and live target count of `d` into the answer.
    static func info(_ d: Device, _ b: inout [UInt8]) {
        var flags = u32(b, Off.flags) & ~(DM.Flags.activePresent.rawValue | DM.Flags.inactivePresent.rawValue | DM.Flags.suspend.rawValue | DM.Flags.readOnly.rawValue)
        if d.live != nil { flags |= DM.Flags.activePresent.rawValue }
        if d.inactive != nil { flags |= DM.Flags.inactivePresent.rawValue }
        if d.suspended { flags |= DM.Flags.suspend.rawValue }
        if d.live?.readOnly == true { flags |= DM.Flags.readOnly.rawValue }
        set32(&b, flags, Off.flags)
        set32(&b, UInt32(bitPattern: d.openCount), Off.openCount)
        set32(&b, d.eventNumber, Off.eventNumber)
        set32(&b, UInt32(d.live?.targets.count ?? 0), Off.targetCount)
        set64(&b, DM.encodeDev(major: major, minor: d.minor), Off.dev)
    }

    /// Writes `data` at data_start, or sets DM_BUFFER_FULL_FLAG when it does not fit.
    static func answer(_ data: [UInt8], _ b: inout [UInt8], dataOut: Bool = false) {
        let start = Int(u32(b, Off.dataStart))
        let size = Int(u32(b, Off.dataSize))
        var flags = u32(b, Off.flags)
        if start + data.count > size {
            flags |= DM.Flags.bufferFull.rawValue
        } else {
            b.replaceSubrange(start..<start + data.count, with: data)
            if dataOut { flags |= DM.Flags.dataOut.rawValue }
        }
        set32(&b, flags, Off.flags)
    }

    /// The errno the target answers where the model throws.
    static func errnoOf(_ e: DeviceError) -> Int32 {
        switch e {
        case .busy, .deviceInUse, .heldOpen: EBUSY
        case .readOnly: EROFS
        case .image(.io(let s)): s.errno
        case .system(_, let n): n
        default: EINVAL
        }
    }

    static func ploopStatus(_ t: Table, _ d: Device) -> String {
        var flags = ""
        if t.fallocNewCluster { flags += "f" }
        if d.noResume { flags += "n" }
        return DMPloop.Status(deltas: t.paths.count, clusterSectors: t.clusterSectors, flags: flags.isEmpty ? "o" : flags).text
    }

    // MARK: - Table load

    /// The targets of a DM_TABLE_LOAD; a ploop target's constructor checks.
    private func load(_ b: [UInt8], readOnly: Bool) throws(Failure) -> Table {
        let count = Int(Self.u32(b, Off.targetCount))
        let size = Int(Self.u32(b, Off.dataSize))
        var at = Int(Self.u32(b, Off.dataStart))
        var table = Table(targets: [], readOnly: readOnly)
        guard count > 0 else { throw Failure(errno: EINVAL) }
        for _ in 0..<count {
            guard at + Off.spec <= size else { throw Failure(errno: EINVAL) }
            let type = Self.string(b, at + Off.specType, max: 16)
            let params = Self.string(b, at + Off.spec, max: size - at - Off.spec)
            table.targets.append(Target(start: Self.u64(b, at + Off.specStart), length: Self.u64(b, at + Off.specLength), type: type, params: params))
            texts.withLock { $0.append("\(Self.u64(b, at + Off.specStart)) \(Self.u64(b, at + Off.specLength)) \(type) \(params)") }
            // Loading, `next` counts from this spec.
            at += Int(Self.u32(b, at + Off.specNext))
        }
        for t in table.targets {
            switch t.type {
            case DMPloop.targetType:
                // DM_TARGET_SINGLETON
                guard table.targets.count == 1, t.start == 0 else { throw Failure(errno: EINVAL) }
                try construct(&table, t.length, t.params)
            case "tracking":
                // Exactly <cluster sectors> <origin>, from sector 0, over an origin no shorter.
                guard table.targets.count == 1, t.start == 0, let o = table.trackingOrigin, o.clusterSectors > 0 else { throw Failure(errno: EINVAL) }
                guard let origin = devices.withLock({ $0[o.name] }), let ol = origin.live else { throw Failure(errno: ENODEV) }
                guard ol.targets[0].length >= t.length else { throw Failure(errno: EBADSLT) }
            case "error", "zero", "linear":
                continue
            default:
                throw Failure(errno: EINVAL)
            }
        }
        return table
    }

    /// dm-ploop's constructor (reference §1.5), top first, then downwards.
    private func construct(_ table: inout Table, _ length: UInt64, _ params: String) throws(Failure) {
        let p: DMPloop.Table
        do { p = try DMPloop.Table(parsing: params) } catch { throw Failure(errno: EINVAL) }
        var fds: [Int32] = []
        var ok = false
        defer { if !ok { for fd in fds { close(fd) } } }
        for fd in p.fds {
            let own = dup(fd)
            // The kernel's fget of a descriptor this process does not have.
            guard own >= 0 else { throw Failure(errno: errno == EBADF ? ENOENT : errno) }
            fds.append(own)
            guard fcntl(own, F_GETFL) & O_ACCMODE != O_WRONLY else { throw Failure(errno: EBADF) }
        }
        let clusterSectors = 1 << p.clusterLog
        let clusterBytes = UInt64(clusterSectors) * 512
        var above: ImageHeader?
        for level in stride(from: fds.count - 1, through: 0, by: -1) {
            let fd = fds[level]
            let isTop = level == fds.count - 1
            var st = stat()
            guard fstat(fd, &st) == 0 else { throw Failure(errno: errno) }
            if level == 0 && p.rawBase {
                guard UInt64(st.st_size) % clusterBytes == 0 else { throw Failure(errno: EPROTO) }
                continue
            }
            if isTop && !table.readOnly && fcntl(fd, F_GETFL) & O_ACCMODE == O_RDONLY { throw Failure(errno: EACCES) }
            // The descriptor may be O_DIRECT (as the original opens images): the header is read
            // through a plain descriptor of the same file.
            let plain = open("/proc/self/fd/\(fd)", O_RDONLY | O_CLOEXEC)
            guard plain >= 0 else { throw Failure(errno: errno) }
            var head = [UInt8](repeating: 0, count: PloopSpec.headerSize)
            let got = head.withUnsafeMutableBytes { pread(plain, $0.baseAddress, $0.count, 0) }
            close(plain)
            guard got == PloopSpec.headerSize else { throw Failure(errno: ENODATA) }
            guard let h = try? ImageHeader.decode(head), h.version == .v2 else { throw Failure(errno: isTop ? Self.enotsupp : EPROTO) }
            if isTop {
                if !table.readOnly && h.diskInUse != PloopSpec.diskInUse { throw Failure(errno: ENOLCK) }
                guard h.clusterSectors == UInt32(clusterSectors) else { throw Failure(errno: EINVAL) }
                guard h.firstBlockOffset == h.layout.firstBlockOffsetSectors else { throw Failure(errno: EINVAL) }
                guard h.sizeInSectors >= length else { throw Failure(errno: EBADSLT) }
            } else if let a = above {
                guard h.clusterSectors == a.clusterSectors, h.type == a.type, h.firstBlockOffset == h.layout.firstBlockOffsetSectors else { throw Failure(errno: EPROTO) }
                guard h.batEntries <= a.batEntries else { throw Failure(errno: EBADSLT) }
            }
            guard UInt64(st.st_size) % clusterBytes == 0 else { throw Failure(errno: EPROTO) }
            // Every BAT entry inside the file's whole clusters (EPROTO), none into the header
            // and BAT clusters (EXDEV).
            guard let f = try? ImagePath.open("/proc/self/fd/\(fd)", write: false),
                let image = try? Ploop1Image(file: f, writable: false, allowDirty: true)
            else { throw Failure(errno: ENODATA) }
            let clusters = UInt64(st.st_size) / clusterBytes
            for (_, b) in image.allocatedClusters() {
                if UInt64(b.value) >= clusters { throw Failure(errno: EPROTO) }
                if b.value < image.firstDataBlock { throw Failure(errno: EXDEV) }
            }
            above = h
        }
        table.fds = fds
        table.paths = fds.map { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\($0)")) ?? "" }
        table.writable = fds.map { fcntl($0, F_GETFL) & O_ACCMODE == O_RDWR }
        table.clusterSectors = clusterSectors
        table.fallocNewCluster = p.fallocNewCluster
        table.rawBase = p.rawBase
        ok = true
    }

    // MARK: - Messages

    private func message(_ name: String, _ text: String) throws(Failure) -> String? {
        let m: DMPloop.Message
        do { m = try DMPloop.Message(parsing: text) } catch {
            throw Failure(errno: error == .unsupported ? Self.enotsupp : EINVAL)
        }
        return try devices.withLock { all throws(Failure) -> String? in
            guard var d = all[name] else { throw Failure(errno: ENXIO) }
            if let o = d.live?.trackingOrigin {
                let reply = try trackingMessage(m, &d, origin: o, all)
                all[name] = d
                return reply
            }
            guard var live = d.live, live.isPloop else { throw Failure(errno: EINVAL) }
            let top = live.paths.count - 1
            let device = d
            func run(_ here: (DeviceModel) throws(DeviceError) -> Void, _ there: (any DeviceBackend, String) throws(DeviceError) -> Void) throws(Failure) {
                try serving(device, name, here, there)
            }
            switch m {
            case .getImageName(let level):
                return level < live.paths.count ? live.levels[level] : ""
            case .setNoResume(let on):
                guard d.noResume != on else { throw Failure(errno: EBUSY) }
                d.noResume = on
            case .notifyMergedBackward(let level):
                // Level L−1 is re-read from its file and serves what L served; L's file goes.
                guard level < top else { throw Failure(errno: ENOENT) }
                guard level > 0, live.paths.count >= 3, !live.flipped || level < top - 1 else { throw Failure(errno: EINVAL) }
                try run({ m throws(DeviceError) in try m.deleteDelta(level: level) }, { b, dev throws(DeviceError) in try b.deleteDelta(dev, level: level) })
                if level < live.fds.count { close(live.fds.remove(at: level)) }
                live.paths.remove(at: level)
                live.writable.remove(at: level)
            case .updateDeltaIndex(let level, let map):
                guard level < top else { throw Failure(errno: ENOENT) }
                let maps = map.map { IndexMap(cluster: $0.cluster, block: $0.block) }
                try run({ m throws(DeviceError) in try m.updateIndex(level: level, maps: maps) }, { b, dev throws(DeviceError) in try b.updateIndex(dev, level: level, maps: maps) })
            case .resize(let sectors):
                // Grows the top image; the device keeps its length until a table with the new one.
                guard !live.readOnly else { throw Failure(errno: EROFS) }
                let length = live.targets[0].length
                guard sectors >= length, sectors % UInt64(live.clusterSectors) == 0 else { throw Failure(errno: EINVAL) }
                if sectors == length { return nil }
                try run({ m throws(DeviceError) in try m.grow(toSectors: sectors) }, { b, dev throws(DeviceError) in try b.grow(dev, sizeSectors: sectors) })
            case .flipUpperDeltas:
                guard d.suspended, d.noResume else { throw Failure(errno: EBUSY) }
                guard !live.readOnly else { throw Failure(errno: EROFS) }
                guard top >= 1 else { throw Failure(errno: ENOENT) }
                let lower = live.levels[top - 1]
                guard !(live.rawBase && top == 1) else { throw Failure(errno: EBADSLT) }
                guard live.writable[live.paths.firstIndex(of: lower) ?? 0] else { throw Failure(errno: EACCES) }
                // The debug build's check: no cluster the top maps may be mapped in the lower file.
                guard Self.disjoint(top: live.levels[top], lower: lower) else { throw Failure(errno: EEXIST) }
                live.flipped.toggle()
            case .merge:
                guard !live.readOnly else { throw Failure(errno: EROFS) }
                guard top >= 1 else { throw Failure(errno: ENOENT) }
                // The reverse merge only: the old top (now below) goes up into the file above it,
                // which the model's merge of the top into the level below does.
                guard live.flipped else { throw Failure(errno: EOPNOTSUPP) }
                let range = (top - 1)...top
                try run({ m throws(DeviceError) in _ = try m.merge(levels: range) }, { b, dev throws(DeviceError) in _ = try b.merge(dev, levels: range, progress: nil) })
                if top < live.fds.count { close(live.fds.removeLast()) }
                live.paths.removeLast()
                live.writable.removeLast()
                live.writable[top - 1] = true
                live.flipped = false
            default:
                throw Failure(errno: Self.enotsupp)
            }
            d.live = live
            all[name] = d
            return nil
        }
    }

    // MARK: - The tracking target

    /// dm-tracking's messages (reference §2.3) on device `d`, whose table tracks `origin`. Writes
    /// reach the origin's images without passing here, so the bitmap is filled from what the
    /// origin's own write tracking (image-file extents) saw, each data block turned back into its
    /// virtual cluster through the top's BAT.
    /// Runs an operation on what serves a device's ploop table: its model here, or the lower
    /// device in shared mode; a failure becomes the errno the kernel would return.
    private func serving(_ device: Device, _ name: String, _ here: (DeviceModel) throws(DeviceError) -> Void,
                         _ there: (any DeviceBackend, String) throws(DeviceError) -> Void) throws(Failure) {
        do throws(DeviceError) {
            if let model = device.live?.model {
                try here(model)
            } else if let sh = shared, let dev = device.lowerDevice {
                try there(sh.lower, dev)
            } else {
                throw .notRunning(name)
            }
        } catch { throw Failure(errno: Self.errnoOf(error)) }
    }

    private func trackingMessage(_ m: DMPloop.Message, _ d: inout Device, origin o: (name: String, clusterSectors: UInt64), _ all: [String: Device]) throws(Failure) -> String? {
        guard let origin = all[o.name], let top = origin.live?.paths.last else { throw Failure(errno: ENODEV) }
        let clusters = (d.live?.targets[0].length ?? 0) / o.clusterSectors
        func run(_ here: (DeviceModel) throws(DeviceError) -> Void, _ there: (any DeviceBackend, String) throws(DeviceError) -> Void) throws(Failure) {
            try serving(origin, o.name, here, there)
        }
        switch m {
        case .trackingStart:
            guard d.tracking == nil else { throw Failure(errno: EEXIST) }
            // Every write from now on, wherever in the file (the position far past any end).
            let everywhere: UInt64 = 1 << 62
            try run({ m throws(DeviceError) in _ = try m.trackInit(); try m.trackSetPosition(everywhere) }, { b, dev throws(DeviceError) in _ = try b.trackInit(dev); try b.trackSetPosition(dev, everywhere) })
            d.tracking = Tracking()
            return nil
        case .trackingStop:
            guard d.tracking != nil else { throw Failure(errno: ENOENT) }
            try? run({ m throws(DeviceError) in try m.trackAbort() }, { b, dev throws(DeviceError) in try b.trackAbort(dev) })
            d.tracking = nil
            return nil
        case .trackingClear(let c):
            guard d.tracking != nil else { throw Failure(errno: ENOENT) }
            guard c < clusters else { throw Failure(errno: EINVAL) }
            d.tracking!.dirty.remove(c)
            return nil
        case .trackingGetNext:
            guard var t = d.tracking else { throw Failure(errno: ENOENT) }
            // What the origin wrote since the last call, as device clusters.
            var extents: [Range<UInt64>] = []
            try run({ m throws(DeviceError) in while let r = try m.trackRead() { extents.append(r) } }, { b, dev throws(DeviceError) in while let r = try b.trackRead(dev) { extents.append(r) } })
            if !extents.isEmpty {
                // BAT entries of new blocks reach the file at a flush: read after one.
                try run({ m throws(DeviceError) in try m.flush() }, { b, dev throws(DeviceError) in try b.sync(dev) })
                let cb = o.clusterSectors * 512
                guard let f = try? ImagePath.open(top, write: false), let image = try? Ploop1Image(file: f, writable: false, allowDirty: true) else { throw Failure(errno: EIO) }
                let owners = image.owners()
                for r in extents {
                    for block in (r.lowerBound / cb)..<((r.upperBound + cb - 1) / cb) {
                        if let c = owners[UInt32(block)], c.value < clusters { t.dirty.insert(c.value) }
                    }
                }
            }
            defer { d.tracking = t }
            guard let next = t.dirty.filter({ $0 >= t.cursor }).min() ?? t.dirty.min() else { return nil }
            t.dirty.remove(next)
            t.cursor = next + 1
            return String(next)
        default:
            throw Failure(errno: Self.enotsupp)
        }
    }

    /// Whether no cluster mapped in `top`'s file is mapped in `lower`'s (both read from disk).
    static func disjoint(top: String, lower: String) -> Bool {
        func mapped(_ path: String) -> Set<UInt64>? {
            guard let f = try? ImagePath.open(path, write: false), let i = try? Ploop1Image(file: f, writable: false, allowDirty: true) else { return nil }
            return Set(i.allocatedClusters().map(\.0.value))
        }
        guard let t = mapped(top), let l = mapped(lower) else { return false }
        return t.isDisjoint(with: l)
    }
}
