import CPloopSys
import PloopDevice

/// Device-mapper ioctl buffers: a `struct dm_ioctl` followed by its payload (target specs and
/// their parameter strings, a target message), built and read at the offsets of the kernel's uapi
/// header (`linux/dm-ioctl.h`, through the C shim). The dm-ploop backend sends these on
/// `/dev/mapper/control`; the fake device-mapper decodes them at offsets its tests write down.
public enum DM {
    /// The commands, by their number in the header (the request is `_IOWR(0xfd, nr, dm_ioctl)`).
    public enum Command: Int32, CaseIterable, Sendable {
        case version = 0, removeAll, listDevices, devCreate, devRemove, devRename, devSuspend, devStatus, devWait
        case tableLoad, tableClear, tableDeps, tableStatus, listVersions, targetMessage, devSetGeometry

        /// The ioctl request number, from the header's macros.
        public var request: UInt { UInt(cploop_dm_request(rawValue)) }

        /// The command a request number carries, if it is one of device-mapper's.
        public init?(request: UInt) {
            guard let c = Command.allCases.first(where: { $0.request == request }) else { return nil }
            self = c
        }
    }

    /// `dm_ioctl.flags`.
    public struct Flags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let readOnly = Flags(rawValue: UInt32(CPLOOP_DM_READONLY.rawValue))
        public static let suspend = Flags(rawValue: UInt32(CPLOOP_DM_SUSPEND.rawValue))
        public static let persistentDevice = Flags(rawValue: UInt32(CPLOOP_DM_PERSISTENT_DEV.rawValue))
        public static let statusTable = Flags(rawValue: UInt32(CPLOOP_DM_STATUS_TABLE.rawValue))
        public static let activePresent = Flags(rawValue: UInt32(CPLOOP_DM_ACTIVE_PRESENT.rawValue))
        public static let inactivePresent = Flags(rawValue: UInt32(CPLOOP_DM_INACTIVE_PRESENT.rawValue))
        public static let bufferFull = Flags(rawValue: UInt32(CPLOOP_DM_BUFFER_FULL.rawValue))
        public static let skipLockfs = Flags(rawValue: UInt32(CPLOOP_DM_SKIP_LOCKFS.rawValue))
        public static let noFlush = Flags(rawValue: UInt32(CPLOOP_DM_NOFLUSH.rawValue))
        public static let queryInactiveTable = Flags(rawValue: UInt32(CPLOOP_DM_QUERY_INACTIVE_TABLE.rawValue))
        public static let ueventGenerated = Flags(rawValue: UInt32(CPLOOP_DM_UEVENT_GENERATED.rawValue))
        public static let dataOut = Flags(rawValue: UInt32(CPLOOP_DM_DATA_OUT.rawValue))
    }

    /// The interface version requests carry: major 4 as the kernel requires, minor 0 so that any
    /// kernel of that major takes them (it refuses a minor above its own).
    public static let interfaceVersion: (UInt32, UInt32, UInt32) = (4, 0, 0)

    /// Where the fields of `struct dm_ioctl` and its payload structures sit.
    public enum Layout {
        public static let header = MemoryLayout<dm_ioctl>.size
        public static let version = MemoryLayout<dm_ioctl>.offset(of: \.version)!
        public static let dataSize = MemoryLayout<dm_ioctl>.offset(of: \.data_size)!
        public static let dataStart = MemoryLayout<dm_ioctl>.offset(of: \.data_start)!
        public static let targetCount = MemoryLayout<dm_ioctl>.offset(of: \.target_count)!
        public static let openCount = MemoryLayout<dm_ioctl>.offset(of: \.open_count)!
        public static let flags = MemoryLayout<dm_ioctl>.offset(of: \.flags)!
        public static let eventNumber = MemoryLayout<dm_ioctl>.offset(of: \.event_nr)!
        public static let dev = MemoryLayout<dm_ioctl>.offset(of: \.dev)!
        public static let name = MemoryLayout<dm_ioctl>.offset(of: \.name)!
        public static let nameBytes = MemoryLayout.size(ofValue: dm_ioctl().name)
        public static let uuid = MemoryLayout<dm_ioctl>.offset(of: \.uuid)!

        public static let spec = MemoryLayout<dm_target_spec>.size
        public static let specSectorStart = MemoryLayout<dm_target_spec>.offset(of: \.sector_start)!
        public static let specLength = MemoryLayout<dm_target_spec>.offset(of: \.length)!
        public static let specStatus = MemoryLayout<dm_target_spec>.offset(of: \.status)!
        public static let specNext = MemoryLayout<dm_target_spec>.offset(of: \.next)!
        public static let specTargetType = MemoryLayout<dm_target_spec>.offset(of: \.target_type)!
        public static let specTargetTypeBytes = MemoryLayout.size(ofValue: dm_target_spec().target_type)

        public static let message = MemoryLayout<dm_target_msg>.size

        public static let nameList = MemoryLayout<dm_name_list>.size
        public static let nameListDev = MemoryLayout<dm_name_list>.offset(of: \.dev)!
        public static let nameListNext = MemoryLayout<dm_name_list>.offset(of: \.next)!
        /// The name follows `dev` and `next` directly (a flexible array in the header).
        public static let nameListName = 12

        /// struct dm_target_versions: `next`, `version[3]`, then the name.
        public static let versions = MemoryLayout<dm_target_versions>.size
        public static let versionsNext = MemoryLayout<dm_target_versions>.offset(of: \.next)!
        public static let versionsVersion = MemoryLayout<dm_target_versions>.offset(of: \.version)!
    }

    /// One target of a table: sectors [start, start+length) served by `type` with `params`.
    public struct Target: Sendable, Equatable {
        public var start: UInt64
        public var length: UInt64
        public var type: String
        public var params: String
        public init(start: UInt64 = 0, length: UInt64, type: String, params: String) {
            self.start = start
            self.length = length
            self.type = type
            self.params = params
        }
        /// As dmsetup prints and takes it: `start length type params`.
        public var line: String { "\(start) \(length) \(type) \(params)" }
    }

    /// Encodes a device number as dm_ioctl.dev carries it (the kernel's huge_encode_dev, which is
    /// glibc's makedev for numbers below 2^32).
    public static func encodeDev(major: UInt32, minor: UInt32) -> UInt64 {
        UInt64(minor & 0xff) | (UInt64(major & 0xfff) << 8) | (UInt64(minor & ~0xff) << 12)
    }

    public static func decodeDev(_ dev: UInt64) -> (major: UInt32, minor: UInt32) {
        (UInt32((dev >> 8) & 0xfff), UInt32(dev & 0xff) | UInt32((dev >> 12) & 0xfff00))
    }

    /// A request: the header fields a command uses and its payload, encoded into a buffer with
    /// room for the kernel's answer.
    public struct Request: Sendable, Equatable {
        public var command: Command
        public var name: String
        public var flags: Flags
        public var dev: UInt64
        public var eventNumber: UInt32
        /// DM_TABLE_LOAD: the table.
        public var targets: [Target]
        /// DM_TARGET_MSG: the sector (0 for every message ploop sends) and the text.
        public var messageSector: UInt64
        public var message: String?
        /// The whole buffer the kernel may write its answer into.
        public var bufferSize: Int

        public init(
            _ command: Command, name: String = "", flags: Flags = [], dev: UInt64 = 0, eventNumber: UInt32 = 0,
            targets: [Target] = [], message: String? = nil, messageSector: UInt64 = 0, bufferSize: Int = 16 << 10
        ) {
            self.command = command
            self.name = name
            self.flags = flags
            self.dev = dev
            self.eventNumber = eventNumber
            self.targets = targets
            self.message = message
            self.messageSector = messageSector
            self.bufferSize = bufferSize
        }

        public func encode() throws(DeviceError) -> [UInt8] {
            let nameBytes = Array(name.utf8)
            guard nameBytes.count < Layout.nameBytes, !nameBytes.contains(0) else {
                throw .invalid("device-mapper name '\(name)': at most \(Layout.nameBytes - 1) bytes, no NUL")
            }
            var payload: [UInt8] = []
            for t in targets {
                let type = Array(t.type.utf8)
                guard type.count < Layout.specTargetTypeBytes else { throw .invalid("target type '\(t.type)' is too long") }
                var spec = [UInt8](repeating: 0, count: Layout.spec)
                spec.put64(t.start, at: Layout.specSectorStart)
                spec.put64(t.length, at: Layout.specLength)
                spec.replaceSubrange(Layout.specTargetType..<Layout.specTargetType + type.count, with: type)
                var params = Array(t.params.utf8) + [0]
                params += [UInt8](repeating: 0, count: (8 - (spec.count + params.count) % 8) % 8)
                // Loading, `next` counts from the start of this spec to the start of the next.
                spec.put32(UInt32(spec.count + params.count), at: Layout.specNext)
                payload += spec + params
            }
            if let m = message {
                var msg = [UInt8](repeating: 0, count: Layout.message)
                msg.put64(messageSector, at: 0)
                payload += msg + Array(m.utf8) + [0]
            }
            let used = Layout.header + payload.count
            var b = [UInt8](repeating: 0, count: max(used, bufferSize))
            b.put32(DM.interfaceVersion.0, at: Layout.version)
            b.put32(DM.interfaceVersion.1, at: Layout.version + 4)
            b.put32(DM.interfaceVersion.2, at: Layout.version + 8)
            b.put32(UInt32(b.count), at: Layout.dataSize)
            b.put32(UInt32(Layout.header), at: Layout.dataStart)
            b.put32(UInt32(targets.count), at: Layout.targetCount)
            b.put32(flags.rawValue, at: Layout.flags)
            b.put32(eventNumber, at: Layout.eventNumber)
            b.put64(dev, at: Layout.dev)
            b.replaceSubrange(Layout.name..<Layout.name + nameBytes.count, with: nameBytes)
            b.replaceSubrange(Layout.header..<used, with: payload)
            return b
        }
    }

    /// What the kernel left in a request's buffer.
    public struct Reply: Sendable {
        public let bytes: [UInt8]
        public init(_ bytes: [UInt8]) { self.bytes = bytes }

        public var flags: Flags { Flags(rawValue: bytes.get32(Layout.flags)) }
        public var openCount: Int32 { Int32(bitPattern: bytes.get32(Layout.openCount)) }
        public var targetCount: Int { Int(bytes.get32(Layout.targetCount)) }
        public var eventNumber: UInt32 { bytes.get32(Layout.eventNumber) }
        public var dev: UInt64 { bytes.get64(Layout.dev) }
        public var version: (UInt32, UInt32, UInt32) { (bytes.get32(Layout.version), bytes.get32(Layout.version + 4), bytes.get32(Layout.version + 8)) }
        var dataStart: Int { Int(bytes.get32(Layout.dataStart)) }
        var dataSize: Int { min(Int(bytes.get32(Layout.dataSize)), bytes.count) }

        /// The answer did not fit: ask again with a bigger buffer.
        public var bufferFull: Bool { flags.contains(.bufferFull) }

        /// DM_LIST_DEVICES: every device's name and number.
        public func devices() throws(DeviceError) -> [(name: String, dev: UInt64)] {
            var out: [(String, UInt64)] = []
            var at = dataStart
            // An empty list is one entry with dev 0 and no name.
            while at + Layout.nameList <= dataSize {
                let dev = bytes.get64(at + Layout.nameListDev)
                let next = Int(bytes.get32(at + Layout.nameListNext))
                let name = bytes.cString(at: at + Layout.nameListName, limit: dataSize)
                if dev == 0 && name.isEmpty { break }
                out.append((name, dev))
                guard next > 0 else { break }
                guard next >= Layout.nameList, at + next <= dataSize else { throw .invalid("device-mapper list: an entry points outside the answer") }
                at += next
            }
            return out
        }

        /// DM_LIST_VERSIONS: the target types the kernel has registered, with their versions.
        public func targetTypes() throws(DeviceError) -> [(name: String, version: (UInt32, UInt32, UInt32))] {
            var out: [(String, (UInt32, UInt32, UInt32))] = []
            var at = dataStart
            while at + Layout.versions <= dataSize {
                let next = Int(bytes.get32(at + Layout.versionsNext))
                let v = (bytes.get32(at + Layout.versionsVersion), bytes.get32(at + Layout.versionsVersion + 4), bytes.get32(at + Layout.versionsVersion + 8))
                let name = bytes.cString(at: at + Layout.versions, limit: dataSize)
                if !name.isEmpty { out.append((name, v)) }
                guard next > 0 else { break }
                guard next >= Layout.versions, at + next <= dataSize else { throw .invalid("device-mapper target list: an entry points outside the answer") }
                at += next
            }
            return out
        }

        /// DM_TABLE_STATUS: the targets with their status (or table) text.
        public func targets() throws(DeviceError) -> [Target] {
            var out: [Target] = []
            var at = dataStart
            for _ in 0..<targetCount {
                guard at + Layout.spec <= dataSize else { throw .invalid("device-mapper status: a target runs past the answer") }
                let type = bytes.cString(at: at + Layout.specTargetType, limit: at + Layout.spec)
                let text = bytes.cString(at: at + Layout.spec, limit: dataSize)
                out.append(Target(start: bytes.get64(at + Layout.specSectorStart), length: bytes.get64(at + Layout.specLength), type: type, params: text))
                // Answering, `next` counts from the first spec.
                let next = Int(bytes.get32(at + Layout.specNext))
                at = dataStart + next
            }
            return out
        }

        /// DM_TARGET_MSG: the target's answer, if it gave one.
        public var messageResponse: String? {
            guard flags.contains(.dataOut), dataStart < dataSize else { return nil }
            var s = bytes.cString(at: dataStart, limit: dataSize)
            if s.hasSuffix("\n") { s.removeLast() }
            return s
        }
    }
}

extension [UInt8] {
    mutating func put32(_ v: UInt32, at o: Int) {
        for i in 0..<4 { self[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }
    mutating func put64(_ v: UInt64, at o: Int) {
        for i in 0..<8 { self[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }
    func get32(_ o: Int) -> UInt32 {
        guard o + 4 <= count else { return 0 }
        return (0..<4).reduce(UInt32(0)) { $0 | UInt32(self[o + $1]) << (8 * $1) }
    }
    func get64(_ o: Int) -> UInt64 {
        guard o + 8 <= count else { return 0 }
        return (0..<8).reduce(UInt64(0)) { $0 | UInt64(self[o + $1]) << (8 * $1) }
    }
    /// The NUL-terminated string at `o` (or up to `limit`).
    func cString(at o: Int, limit: Int) -> String {
        guard o < Swift.min(limit, count) else { return "" }
        let end = self[o..<Swift.min(limit, count)].firstIndex(of: 0) ?? Swift.min(limit, count)
        return String(decoding: self[o..<end], as: UTF8.self)
    }
}
