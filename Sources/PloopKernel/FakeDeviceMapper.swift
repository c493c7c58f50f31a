import Foundation
import PloopDevice
import PloopFormat
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
/// So far it models the device lifecycle, listing, status, `get_img_name`, `set_noresume`,
/// `resize`, `notify_merged_backward`, `update_delta_index`, and
/// I/O on a live ploop table (a `DeviceModel` over the images, opened by path when the table goes
/// live and flushed on suspend). Not yet: `merge`, `flip_upper_deltas` and the
/// tracking target: those answer ENOTSUPP (524) here. BAT entries are not checked at load.
public final class FakeDeviceMapper: DMTransport {
    /// ENOTSUPP, the kernel-internal errno dm-ploop answers unknown messages with.
    public static let enotsupp: Int32 = 524

    struct Table {
        var targets: [(start: UInt64, length: UInt64, type: String, params: String)]
        var readOnly: Bool
        /// ploop: our duplicates of the table's descriptors, base first.
        var fds: [Int32] = []
        var paths: [String] = []
        var clusterSectors = 0
        var fallocNewCluster = false
        var rawBase = false
        /// The ploop target's I/O, from the moment the table goes live: a device model over the
        /// images the descriptors name (opened by path), which leaves the in-use mark to user
        /// space as dm-ploop does.
        var model: DeviceModel?
    }

    struct Device {
        var name: String
        var minor: UInt32
        var live: Table?
        var inactive: Table?
        var suspended = false
        var noResume = false
        var openCount: Int32 = 0
        var eventNumber: UInt32 = 0
    }

    public static let major: UInt32 = 253
    /// The target types this fake has registered (DM_LIST_VERSIONS).
    static let targetTypes: [(String, (UInt32, UInt32, UInt32))] = [("ploop", (1, 0, 0)), ("tracking", (1, 0, 0)), ("linear", (1, 4, 0)), ("zero", (1, 2, 0)), ("error", (1, 6, 0))]
    private let devices = Mutex<[String: Device]>([:])
    /// Every command decoded, in order (tests read it).
    public let commands = Mutex<[(DM.Command, String)]>([])
    /// Every table line loaded (`start length type params`) and every message, in order.
    public let texts = Mutex<[String]>([])

    public init() {}

    deinit {
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
        _ = try liveModel(name)
        return LiveIO(fake: self, name: name)
    }

    /// Requests hold this shared; a table swap holds it alone, so none is in flight meanwhile.
    let ioGate = ReadWriteLock(())

    func liveModel(_ name: String) throws(DeviceError) -> DeviceModel {
        guard let m = devices.withLock({ $0[name]?.live?.model }) else { throw .noSuchDevice("/dev/mapper/\(name)") }
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
        do {
            try perform(cmd, name, &b)
            return 0
        } catch {
            return -error.errno
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
            let table = try load(b, readOnly: flags & DM.Flags.readOnly.rawValue != 0)
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
                    if flags & DM.Flags.noFlush.rawValue == 0 { try? d.live?.model?.flush() }
                    d.suspended = true
                } else {
                    if d.noResume && d.suspended { throw Failure(errno: EAGAIN) }
                    if var t = d.inactive {
                        Self.release(d.live)
                        if t.targets.first?.type == DMPloop.targetType {
                            do {
                                t.model = try DeviceModel(
                                    MountRequest(images: t.paths, baseFormat: t.rawBase ? .raw : .ploop1, readOnly: t.readOnly, clusterSectors: UInt32(t.clusterSectors)),
                                    callerOwnsInUse: true)
                            } catch {
                                d.live = nil
                                d.inactive = nil
                                all[name] = d
                                Self.release(t)
                                throw Failure(errno: EIO)
                            }
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
                    let text = t.type == DMPloop.targetType && table != nil ? Self.ploopStatus(table!, d) : t.params
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
            let reply = try message(name, text)
            if let r = reply { Self.answer(Array((r + "\n").utf8) + [0], &b, dataOut: true) }
        default:
            throw Failure(errno: ENOTTY)
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
        case .busy, .deviceInUse: EBUSY
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
        return DMPloop.Status(deltas: t.fds.count, clusterSectors: t.clusterSectors, flags: flags.isEmpty ? "o" : flags).text
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
            table.targets.append((Self.u64(b, at + Off.specStart), Self.u64(b, at + Off.specLength), type, params))
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
            case "error", "zero", "linear", "tracking":
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
            above = h
        }
        table.fds = fds
        table.paths = fds.map { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\($0)")) ?? "" }
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
            guard let live = d.live, live.targets.first?.type == DMPloop.targetType else { throw Failure(errno: EINVAL) }
            switch m {
            case .getImageName(let level):
                return level < live.paths.count ? live.paths[level] : ""
            case .setNoResume(let on):
                guard d.noResume != on else { throw Failure(errno: EBUSY) }
                d.noResume = on
                all[name] = d
                return nil
            case .notifyMergedBackward(let level):
                // Level L−1 is re-read from its file and serves what L served; L's file goes.
                guard let model = live.model else { throw Failure(errno: EINVAL) }
                let top = live.fds.count - 1
                guard level < top else { throw Failure(errno: ENOENT) }
                guard level > 0, live.fds.count >= 3 else { throw Failure(errno: EINVAL) }
                do throws(DeviceError) { try model.deleteDelta(level: level) } catch { throw Failure(errno: Self.errnoOf(error)) }
                close(live.fds[level])
                var t = live
                t.fds.remove(at: level)
                t.paths.remove(at: level)
                d.live = t
                all[name] = d
                return nil
            case .updateDeltaIndex(let level, let map):
                guard let model = live.model else { throw Failure(errno: EINVAL) }
                guard level < live.fds.count - 1 else { throw Failure(errno: ENOENT) }
                do throws(DeviceError) { try model.updateIndex(level: level, maps: map.map { IndexMap(cluster: $0.cluster, block: $0.block) }) } catch {
                    throw Failure(errno: Self.errnoOf(error))
                }
                return nil
            case .resize(let sectors):
                // Grows the top image; the device keeps its length until a table with the new one.
                guard let model = live.model else { throw Failure(errno: EINVAL) }
                guard !live.readOnly else { throw Failure(errno: EROFS) }
                let length = live.targets[0].length
                guard sectors >= length, sectors % UInt64(live.clusterSectors) == 0 else { throw Failure(errno: EINVAL) }
                if sectors == length { return nil }
                do { try model.grow(toSectors: sectors) } catch { throw Failure(errno: EIO) }
                return nil
            default:
                throw Failure(errno: Self.enotsupp)
            }
        }
    }
}
