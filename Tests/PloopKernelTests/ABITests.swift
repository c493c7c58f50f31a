import CPloopSys
import Foundation
import PloopDevice
import PloopKernel
import PloopTestSupport
import Testing

/// The kernel ABI, checked against numbers written down independently (the reference's table, and
/// the _IOC formula with the kernel's struct sizes), never read back from our own constants.
struct ABIGoldenTests {
    @Test func structSizes() {
        #expect(MemoryLayout<cploop_ctl_chunk>.size == 32)
        #expect(MemoryLayout<cploop_ctl>.size == 24)
        #expect(MemoryLayout<cploop_ctl_delta>.size == 120)
        #expect(MemoryLayout<cploop_truncate_ctl>.size == 16)
        #expect(MemoryLayout<cploop_reloc_map>.size == 8)
        #expect(MemoryLayout<cploop_index_update_ctl>.size == 8)
        #expect(MemoryLayout<cploop_freeblks_ctl_extent>.size == 16)
        #expect(MemoryLayout<cploop_freeblks_ctl>.size == 16)
        #expect(MemoryLayout<cploop_relocblks_ctl_extent>.size == 16)
        #expect(MemoryLayout<cploop_relocblks_ctl>.size == 16)
        #expect(MemoryLayout<cploop_balloon_ctl>.size == 16)
        #expect(MemoryLayout<cploop_getdevice_ctl>.size == 8)
        #expect(MemoryLayout<cploop_track_extent>.size == 16)
        #expect(MemoryLayout<cploop_push_backup_init_ctl>.size == 24)
    }

    @Test func fieldOffsets() {
        #expect(MemoryLayout<cploop_ctl_chunk>.offset(of: \.pctl_type) == 4)
        #expect(MemoryLayout<cploop_ctl_chunk>.offset(of: \.pctl_flags) == 8)
        #expect(MemoryLayout<cploop_ctl_chunk>.offset(of: \.pctl_offset) == 12)
        #expect(MemoryLayout<cploop_ctl_chunk>.offset(of: \.pctl_start) == 16)
        #expect(MemoryLayout<cploop_ctl_chunk>.offset(of: \.pctl_len) == 24)
        #expect(MemoryLayout<cploop_ctl>.offset(of: \.pctl_flags) == 4)
        #expect(MemoryLayout<cploop_ctl>.offset(of: \.pctl_cluster_log) == 8)
        #expect(MemoryLayout<cploop_ctl>.offset(of: \.pctl_size) == 12)
        #expect(MemoryLayout<cploop_ctl>.offset(of: \.pctl_chunks) == 16)
        #expect(MemoryLayout<cploop_ctl>.offset(of: \.pctl_level) == 18)
        #expect(MemoryLayout<cploop_ctl>.offset(of: \.mbz2) == 20)
        #expect(MemoryLayout<cploop_ctl_delta>.offset(of: \.f) == 24)
        #expect(MemoryLayout<cploop_ctl_delta>.offset(of: \.cookie) == 56)
        #expect(MemoryLayout<cploop_truncate_ctl>.offset(of: \.alloc_head) == 4)
        #expect(MemoryLayout<cploop_truncate_ctl>.offset(of: \.level) == 8)
        #expect(MemoryLayout<cploop_index_update_ctl>.offset(of: \.level) == 4)
        #expect(MemoryLayout<cploop_freeblks_ctl_extent>.offset(of: \.len) == 8)
        #expect(MemoryLayout<cploop_freeblks_ctl>.offset(of: \.alloc_head) == 4)
        #expect(MemoryLayout<cploop_freeblks_ctl>.offset(of: \.level) == 8)
        #expect(MemoryLayout<cploop_relocblks_ctl_extent>.offset(of: \.free) == 12)
        #expect(MemoryLayout<cploop_relocblks_ctl>.offset(of: \.n_scanned) == 4)
        #expect(MemoryLayout<cploop_relocblks_ctl>.offset(of: \.alloc_head) == 8)
        #expect(MemoryLayout<cploop_relocblks_ctl>.offset(of: \.level) == 12)
        #expect(MemoryLayout<cploop_balloon_ctl>.offset(of: \.alloc_head) == 4)
        #expect(MemoryLayout<cploop_balloon_ctl>.offset(of: \.level) == 8)
        #expect(MemoryLayout<cploop_balloon_ctl>.offset(of: \.inflate) == 9)
        #expect(MemoryLayout<cploop_balloon_ctl>.offset(of: \.keep_intact) == 10)
        #expect(MemoryLayout<cploop_track_extent>.offset(of: \.end) == 8)
    }

    /// The reference's table of request values (x86-64), nr → value.
    static let table: [(KernelIoctl, UInt)] = [
        (.addDelta, 0x4018_5000), (.clear, 0x5001), (.stop, 0x5002), (.start, 0x5003), (.snapshot, 0x4018_5004),
        (.delDelta, 0x4004_5005), (.trackInit, 0x8010_5006), (.trackStop, 0x5007), (.trackAbort, 0x5008),
        (.trackSetPos, 0x4008_5009), (.trackRead, 0x8010_500a), (.sync, 0x500b), (.merge, 0x500c),
        (.replaceDelta, 0x4018_500d), (.truncate, 0x4010_500e), (.updateIndex, 0x4008_5010), (.grow, 0x4018_5011),
        (.fbGet, 0x4010_5012), (.balloon, 0x4010_5013), (.freeBlocks, 0x4010_5014), (.relocBlocks, 0x4010_5015),
        (.getDevice, 0x4008_5016), (.discardInit, 0x5017), (.discardFini, 0x5018), (.discardWait, 0x5019),
        (.fbDrop, 0x501a), (.fbFilter, 0x8008_501b), (.maxDeltaSize, 0x4008_501c), (.pushBackupInit, 0x8018_501d),
        (.pushBackupIO, 0x8018_501e), (.pushBackupStop, 0x8018_501f), (.freeze, 0x5020), (.thaw, 0x5021),
    ]

    @Test func requestNumbersMatchTheReferenceTable() {
        for (ioctl, value) in Self.table {
            #expect(ioctl.request == value, "\(ioctl): 0x\(String(ioctl.request, radix: 16)) vs 0x\(String(value, radix: 16))")
        }
    }

    /// The same numbers from the _IOC formula and the reference's struct sizes.
    @Test func requestNumbersMatchTheFormula() {
        func io(_ nr: UInt) -> UInt { 0x5000 | nr }
        func iow(_ nr: UInt, _ size: UInt) -> UInt { 0x4000_0000 | size << 16 | 0x5000 | nr }
        func ior(_ nr: UInt, _ size: UInt) -> UInt { 0x8000_0000 | size << 16 | 0x5000 | nr }
        for (ioctl, value) in Self.table {
            let nr = UInt(ioctl.rawValue)
            let direction = value >> 30
            let size = (value >> 16) & 0x3fff
            let formula = direction == 1 ? iow(nr, size) : direction == 2 ? ior(nr, size) : io(nr)
            #expect(formula == value)
        }
        #expect(iow(0, 24) == KernelIoctl.addDelta.request)
        #expect(ior(6, 16) == KernelIoctl.trackInit.request)
        #expect(iow(19, 16) == KernelIoctl.balloon.request)
    }
}

/// sysfs parsing on fixture trees laid out as the kernel lays them out.
struct SysfsTests {
    static func tree(_ dir: ScratchDirectory, _ files: [String: String]) throws {
        for (path, content) in files {
            let full = dir.file(path)
            try FileManager.default.createDirectory(atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            _ = FileManager.default.createFile(atPath: full, contents: Data((content + "\n").utf8))
        }
    }

    @Test func runningDeviceWithTwoDeltas() throws {
        let d = try ScratchDirectory()
        try Self.tree(d, [
            "block/ploop3/pstate/running": "1", "block/ploop3/pstate/block_size": "2048",
            "block/ploop3/pstate/fmt_version": "2", "block/ploop3/pstate/top": "1", "block/ploop3/pstate/cookie": "101",
            "block/ploop3/pdelta/0/image": "/vz/root.hdd", "block/ploop3/pdelta/0/format": "ploop1",
            "block/ploop3/pdelta/0/ro": "1", "block/ploop3/pdelta/0/io": "direct",
            "block/ploop3/pdelta/1/image": "/vz/root.hdd.{5fbaabe3}", "block/ploop3/pdelta/1/format": "ploop1",
            "block/ploop3/pdelta/1/ro": "0", "block/ploop3/pdelta/1/io": "kaio",
            "module/ploop/parameters/large_disk_support": "1",
        ])
        let s = try KernelDeviceState.read(sysfs: d.path, index: 3)
        #expect(s.running && s.blockSize == 2048 && s.formatVersion == 2 && s.top == 1 && s.cookie == "101")
        #expect(s.deltas.map(\.image) == ["/vz/root.hdd", "/vz/root.hdd.{5fbaabe3}"])
        #expect(s.deltas.map(\.readOnly) == [true, false])
        #expect(s.deltas.map(\.io) == ["direct", "kaio"])
        #expect(KernelDeviceState.module(sysfs: d.path) == (true, true) ? true : false)
    }

    @Test func rawBaseAndStoppedDevice() throws {
        let d = try ScratchDirectory()
        try Self.tree(d, [
            "block/ploop0/pstate/running": "0", "block/ploop0/pstate/block_size": "64",
            "block/ploop0/pdelta/0/image": "/img/base.raw", "block/ploop0/pdelta/0/format": "raw", "block/ploop0/pdelta/0/ro": "1",
        ])
        let s = try KernelDeviceState.read(sysfs: d.path, index: 0)
        #expect(!s.running && s.blockSize == 64 && s.deltas.first?.format == .raw)
        #expect(KernelDeviceState.module(sysfs: d.path).loaded == false)
    }

    @Test func errors() throws {
        let d = try ScratchDirectory()
        #expect(throws: KernelDeviceState.Error.missing(d.file("block/ploop9") + "/pstate/running")) {
            try KernelDeviceState.read(sysfs: d.path, index: 9)
        }
        try Self.tree(d, ["block/ploop1/pstate/running": "yes", "block/ploop1/pstate/block_size": "2048"])
        #expect(throws: KernelDeviceState.Error.malformed(d.file("block/ploop1") + "/pstate/running", "yes")) {
            try KernelDeviceState.read(sysfs: d.path, index: 1)
        }
    }
}
