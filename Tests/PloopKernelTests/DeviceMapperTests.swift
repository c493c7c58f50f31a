import CPloopSys
import PloopDevice
import PloopKernel
import Testing

/// The device-mapper ABI and the dm-ploop text, checked against numbers and bytes written down
/// here from the uapi header's definitions (x86-64), never read back from our own constants.
struct DeviceMapperABIGoldenTests {
    @Test func structLayout() {
        #expect(MemoryLayout<dm_ioctl>.size == 312)
        #expect(DM.Layout.header == 312)
        #expect(DM.Layout.version == 0)
        #expect(DM.Layout.dataSize == 12)
        #expect(DM.Layout.dataStart == 16)
        #expect(DM.Layout.targetCount == 20)
        #expect(DM.Layout.openCount == 24)
        #expect(DM.Layout.flags == 28)
        #expect(DM.Layout.eventNumber == 32)
        #expect(DM.Layout.dev == 40)
        #expect(DM.Layout.name == 48)
        #expect(DM.Layout.nameBytes == 128)
        #expect(DM.Layout.uuid == 176)
        #expect(DM.Layout.spec == 40)
        #expect(DM.Layout.specSectorStart == 0)
        #expect(DM.Layout.specLength == 8)
        #expect(DM.Layout.specStatus == 16)
        #expect(DM.Layout.specNext == 20)
        #expect(DM.Layout.specTargetType == 24)
        #expect(DM.Layout.specTargetTypeBytes == 16)
        #expect(DM.Layout.message == 8)
        #expect(DM.Layout.nameList == 16)
        #expect(DM.Layout.nameListDev == 0)
        #expect(DM.Layout.nameListNext == 8)
        #expect(DM.Layout.versions == 16)
        #expect(DM.Layout.versionsNext == 0)
        #expect(DM.Layout.versionsVersion == 4)
    }

    /// `_IOWR(0xfd, nr, struct dm_ioctl)`: direction 3 << 30, size 312 << 16, type 0xfd << 8, nr.
    @Test func requestNumbers() {
        let expected: [(DM.Command, UInt)] = [
            (.version, 0xC138_FD00), (.removeAll, 0xC138_FD01), (.listDevices, 0xC138_FD02),
            (.devCreate, 0xC138_FD03), (.devRemove, 0xC138_FD04), (.devRename, 0xC138_FD05),
            (.devSuspend, 0xC138_FD06), (.devStatus, 0xC138_FD07), (.devWait, 0xC138_FD08),
            (.tableLoad, 0xC138_FD09), (.tableClear, 0xC138_FD0A), (.tableDeps, 0xC138_FD0B),
            (.tableStatus, 0xC138_FD0C), (.listVersions, 0xC138_FD0D), (.targetMessage, 0xC138_FD0E),
            (.devSetGeometry, 0xC138_FD0F),
        ]
        #expect(expected.count == DM.Command.allCases.count)
        for (c, n) in expected {
            #expect(c.request == n, "\(c)")
            #expect(DM.Command(request: n) == c)
        }
        #expect(DM.Command(request: 0x4018_5000) == nil)
    }

    @Test func flagBits() {
        #expect(DM.Flags.readOnly.rawValue == 1 << 0)
        #expect(DM.Flags.suspend.rawValue == 1 << 1)
        #expect(DM.Flags.persistentDevice.rawValue == 1 << 3)
        #expect(DM.Flags.statusTable.rawValue == 1 << 4)
        #expect(DM.Flags.activePresent.rawValue == 1 << 5)
        #expect(DM.Flags.inactivePresent.rawValue == 1 << 6)
        #expect(DM.Flags.bufferFull.rawValue == 1 << 8)
        #expect(DM.Flags.skipLockfs.rawValue == 1 << 10)
        #expect(DM.Flags.noFlush.rawValue == 1 << 11)
        #expect(DM.Flags.queryInactiveTable.rawValue == 1 << 12)
        #expect(DM.Flags.ueventGenerated.rawValue == 1 << 13)
        #expect(DM.Flags.dataOut.rawValue == 1 << 16)
    }

    @Test func headerVersionIsFour() {
        var v: [UInt32] = [0, 0, 0]
        v.withUnsafeMutableBufferPointer { cploop_dm_header_version($0.baseAddress!) }
        #expect(v[0] == 4)
        #expect(DM.interfaceVersion == (4, 0, 0))
    }

    /// dev as the kernel's huge_decode_dev reads it.
    @Test func deviceNumbers() {
        #expect(DM.encodeDev(major: 253, minor: 1000) == 0x30_FDE8)
        #expect(DM.encodeDev(major: 253, minor: 5) == 0xFD05)
        #expect(DM.encodeDev(major: 253, minor: 66534) == 0x1030_FDE6)
        for minor: UInt32 in [0, 5, 255, 256, 1000, 66534, 0xF_FFFF] {
            #expect(DM.decodeDev(DM.encodeDev(major: 253, minor: minor)) == (253, minor))
        }
    }
}

/// Byte-level requests as the kernel reads them.
struct DeviceMapperRequestTests {
    static func u32(_ b: [UInt8], _ o: Int) -> UInt32 { UInt32(b[o]) | UInt32(b[o + 1]) << 8 | UInt32(b[o + 2]) << 16 | UInt32(b[o + 3]) << 24 }
    static func u64(_ b: [UInt8], _ o: Int) -> UInt64 { UInt64(u32(b, o)) | UInt64(u32(b, o + 4)) << 32 }
    static func str(_ b: [UInt8], _ o: Int) -> String { String(decoding: b[o...].prefix { $0 != 0 }, as: UTF8.self) }

    /// The create of `ploop1000` as libdm makes it: persistent minor, no payload.
    @Test func create() throws {
        let b = try DM.Request(.devCreate, name: "ploop1000", flags: .persistentDevice, dev: DM.encodeDev(major: 253, minor: 1000), bufferSize: 0).encode()
        #expect(b.count == 312)
        #expect(Self.u32(b, 0) == 4 && Self.u32(b, 4) == 0 && Self.u32(b, 8) == 0)
        #expect(Self.u32(b, 12) == 312)  // data_size: the whole buffer
        #expect(Self.u32(b, 16) == 312)  // data_start: right after the header
        #expect(Self.u32(b, 20) == 0)
        #expect(Self.u32(b, 28) == 8)  // DM_PERSISTENT_DEV_FLAG
        #expect(Self.u64(b, 40) == 0x30_FDE8)
        #expect(Self.str(b, 48) == "ploop1000")
        #expect(b[57...].allSatisfy { $0 == 0 })
    }

    /// The table of the reference's example: `0 20971520 ploop 11 falloc_new_clu 5 6`.
    @Test func tableLoad() throws {
        let table = DMPloop.Table(clusterLog: 11, fds: [5, 6], fallocNewCluster: true)
        #expect(table.params == "11 falloc_new_clu 5 6")
        let t = DM.Target(length: 20_971_520, type: DMPloop.targetType, params: table.params)
        #expect(t.line == "0 20971520 ploop 11 falloc_new_clu 5 6")
        let b = try DM.Request(.tableLoad, name: "ploop1000", targets: [t], bufferSize: 0).encode()
        #expect(Self.u32(b, 20) == 1)  // target_count
        let spec = 312
        #expect(Self.u64(b, spec) == 0)
        #expect(Self.u64(b, spec + 8) == 20_971_520)
        #expect(Self.u32(b, spec + 16) == 0)
        #expect(Self.str(b, spec + 24) == "ploop")
        #expect(Self.str(b, spec + 40) == "11 falloc_new_clu 5 6")
        // "11 falloc_new_clu 5 6" + NUL = 22 bytes; 40 + 22 = 62, padded to 64.
        #expect(Self.u32(b, spec + 20) == 64)
        #expect(b.count == 312 + 64)
        #expect(Self.u32(b, 12) == UInt32(b.count))
    }

    @Test func twoTargetsChainByNext() throws {
        let b = try DM.Request(.tableLoad, name: "x", targets: [
            DM.Target(length: 8, type: "zero", params: ""),
            DM.Target(start: 8, length: 8, type: "error", params: "abcdefgh"),
        ], bufferSize: 0).encode()
        #expect(Self.u32(b, 20) == 2)
        #expect(Self.u32(b, 312 + 20) == 48)  // 40 + "" NUL 1 → 41 → 48
        let second = 312 + 48
        #expect(Self.u64(b, second) == 8 && Self.str(b, second + 24) == "error" && Self.str(b, second + 40) == "abcdefgh")
        #expect(Self.u32(b, second + 20) == 56)  // 40 + 9 → 49 → 56
    }

    @Test func message() throws {
        let b = try DM.Request(.targetMessage, name: "ploop1000", message: DMPloop.Message.getImageName(level: 1).text).encode()
        #expect(Self.u64(b, 312) == 0)  // sector
        #expect(Self.str(b, 320) == "get_img_name 1")
        #expect(b.count == 16 << 10)  // room for the answer
        #expect(Self.u32(b, 12) == 16 << 10)
    }

    @Test func refusedNames() {
        #expect(throws: DeviceError.self) { try DM.Request(.devCreate, name: String(repeating: "n", count: 128)).encode() }
        #expect(throws: DeviceError.self) { try DM.Request(.tableLoad, name: "x", targets: [DM.Target(length: 1, type: String(repeating: "t", count: 16), params: "")]).encode() }
    }
}

/// Answers built here at the header's offsets, read back through `DM.Reply`.
struct DeviceMapperReplyTests {
    static func put32(_ b: inout [UInt8], _ v: UInt32, _ o: Int) { for i in 0..<4 { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
    static func put64(_ b: inout [UInt8], _ v: UInt64, _ o: Int) { for i in 0..<8 { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
    static func header(size: Int, flags: UInt32 = 0, targets: UInt32 = 0) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: size)
        put32(&b, 4, 0)
        put32(&b, UInt32(size), 12)
        put32(&b, 312, 16)
        put32(&b, targets, 20)
        put32(&b, flags, 28)
        return b
    }

    @Test func listOfDevices() throws {
        var b = Self.header(size: 1024)
        // Entry: dev u64, next u32 (from this entry), name; entries 8-aligned.
        Self.put64(&b, DM.encodeDev(major: 253, minor: 1000), 312)
        Self.put32(&b, 32, 320)
        b.replaceSubrange(324..<333, with: Array("ploop1000".utf8))
        Self.put64(&b, DM.encodeDev(major: 253, minor: 3), 344)
        Self.put32(&b, 0, 352)
        b.replaceSubrange(356..<365, with: Array("vg-root_1".utf8))
        let list = try DM.Reply(b).devices()
        #expect(list.map(\.name) == ["ploop1000", "vg-root_1"])
        #expect(DM.decodeDev(list[0].dev) == (253, 1000))
        #expect(try DM.Reply(Self.header(size: 1024)).devices().isEmpty)
    }

    @Test func tableStatus() throws {
        var b = Self.header(size: 1024, targets: 1)
        Self.put64(&b, 0, 312)
        Self.put64(&b, 20_971_520, 320)
        Self.put32(&b, 56, 332)  // next: from the first spec
        b.replaceSubrange(336..<341, with: Array("ploop".utf8))
        b.replaceSubrange(352..<363, with: Array("2 v2 2048 f".utf8))
        let t = try DM.Reply(b).targets()
        #expect(t == [DM.Target(length: 20_971_520, type: "ploop", params: "2 v2 2048 f")])
        let s = try DMPloop.Status(parsing: t[0].params)
        #expect(s == DMPloop.Status(deltas: 2, clusterSectors: 2048, flags: "f"))
    }

    /// struct dm_target_versions entries: next (from this entry), version[3], name; 8-aligned.
    @Test func targetTypes() throws {
        var b = Self.header(size: 1024)
        Self.put32(&b, 24, 312)
        Self.put32(&b, 1, 316); Self.put32(&b, 4, 320); Self.put32(&b, 0, 324)
        b.replaceSubrange(328..<334, with: Array("linear".utf8))
        Self.put32(&b, 0, 336)
        Self.put32(&b, 1, 340); Self.put32(&b, 0, 344); Self.put32(&b, 2, 348)
        b.replaceSubrange(352..<357, with: Array("ploop".utf8))
        let t = try DM.Reply(b).targetTypes()
        #expect(t.map(\.name) == ["linear", "ploop"])
        #expect(t[0].version == (1, 4, 0) && t[1].version == (1, 0, 2))
    }

    @Test func messageAnswer() {
        var b = Self.header(size: 512, flags: 1 << 16)
        let text = Array("/vz/root.hdd/root.hds\n".utf8)
        b.replaceSubrange(312..<312 + text.count, with: text)
        #expect(DM.Reply(b).messageResponse == "/vz/root.hdd/root.hds")
        #expect(DM.Reply(Self.header(size: 512)).messageResponse == nil)
        #expect(DM.Reply(Self.header(size: 512, flags: 1 << 8)).bufferFull)
    }
}

/// dm-ploop's words, as user space writes them and the kernel reads them.
struct DMPloopTextTests {
    @Test func tableParameters() throws {
        #expect(DMPloop.Table.clusterLog(sectors: 2048) == 11)
        #expect(DMPloop.Table.clusterLog(sectors: 128) == 7)
        #expect(DMPloop.Table(clusterLog: 11, fds: [7]).params == "11 7")
        #expect(DMPloop.Table(clusterLog: 11, fds: [3, 4, 9], rawBase: true).params == "11 raw@3 4 9")
        for t in [DMPloop.Table(clusterLog: 11, fds: [5, 6], fallocNewCluster: true), DMPloop.Table(clusterLog: 9, fds: [3, 4], rawBase: true, offset: 2048)] {
            #expect(try DMPloop.Table(parsing: t.params) == t)
        }
        // User space's own shape after create: two spaces, no words.
        #expect(try DMPloop.Table(parsing: "11  5 6") == DMPloop.Table(clusterLog: 11, fds: [5, 6]))
        for bad in ["11", "x 5", "11 5 raw@6", "11 falloc_new_clu", "11 5 six"] {
            #expect(throws: DeviceError.self, "\(bad)") { try DMPloop.Table(parsing: bad) }
        }
    }

    @Test func statusLine() throws {
        #expect(DMPloop.Status(deltas: 1, clusterSectors: 2048).text == "1 v2 2048 o")
        #expect(try DMPloop.Status(parsing: "3 v2 2048 fn") == DMPloop.Status(deltas: 3, clusterSectors: 2048, flags: "fn"))
        for bad in ["", "2 v1 2048 o", "two v2 2048", "2 v2"] {
            #expect(throws: DeviceError.self, "\(bad)") { try DMPloop.Status(parsing: bad) }
        }
    }

    @Test func messages() throws {
        let all: [(DMPloop.Message, String)] = [
            (.getImageName(level: 0), "get_img_name 0"),
            (.merge, "merge"),
            (.notifyMergedBackward(level: 2), "notify_merged_backward 2"),
            (.updateDeltaIndex(level: 1, map: [(5, 300), (6, 301)]), "update_delta_index 1 5:300;6:301;"),
            (.resize(sectors: 41_943_040), "resize 41943040"),
            (.setNoResume(true), "set_noresume 1"),
            (.setNoResume(false), "set_noresume 0"),
            (.flipUpperDeltas, "flip_upper_deltas"),
            (.trackingStart, "tracking_start"),
            (.trackingStop, "tracking_stop"),
            (.trackingClear(cluster: 17), "tracking_clear 17"),
            (.trackingGetNext, "tracking_get_next"),
        ]
        for (m, text) in all {
            #expect(m.text == text)
            #expect(try DMPloop.Message(parsing: text) == m)
        }
        #expect(throws: DMMessageError.unsupported) { try DMPloop.Message(parsing: "get_delta_name 0") }
        #expect(throws: DMMessageError.invalidArgument) { try DMPloop.Message(parsing: "") }
        #expect(throws: DMMessageError.invalidArgument) { try DMPloop.Message(parsing: "merge now") }
        #expect(throws: DMMessageError.invalidArgument) { try DMPloop.Message(parsing: "set_noresume 2") }
        #expect(throws: DMMessageError.invalidArgument) { try DMPloop.Message(parsing: "update_delta_index 1 5-300;") }
        #expect(throws: DMMessageError.invalidArgument) { try DMPloop.Message(parsing: "get_img_name -1") }
    }

    @Test func names() {
        #expect(DMPloop.name(1000) == "ploop1000")
        #expect(DMPloop.node(1000) == "/dev/mapper/ploop1000")
    }
}
