import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopKernel
import PloopTestSupport
import Testing

/// The fake device-mapper driven through the same request and answer codec the dm-ploop backend
/// uses: the device lifecycle, listing, status and the ploop constructor's refusals, each with the
/// errno the kernel gives (reference dm-ploop.md §1.2, §1.5, §2, §3).
struct FakeDeviceMapperTests {
    let dir: ScratchDirectory
    let dm = FakeDeviceMapper()

    init() throws { dir = try ScratchDirectory("ploop-dm") }

    /// A v2 image of `clusters` 1 MiB clusters, marked in use (as user space marks a top) unless
    /// told otherwise; returns its path.
    func image(_ name: String, clusters: UInt64 = 16, version: FormatVersion = .v2, inUse: Bool = true, clusterSectors: UInt32 = 2048) throws -> String {
        let p = dir.file(name)
        try Offline.initialize(.init(path: p, sizeSectors: clusters * UInt64(clusterSectors), clusterSectors: clusterSectors, version: version))
        if inUse {
            let fd = open(p, O_WRONLY)
            var v = PloopSpec.diskInUse.littleEndian
            _ = withUnsafeBytes(of: &v) { pwrite(fd, $0.baseAddress, 4, off_t(ImageHeader.diskInUseOffset)) }
            close(fd)
        }
        return p
    }

    /// Sends one request; the errno (0 on success) and the answer.
    @discardableResult
    func send(_ r: DM.Request) throws -> (Int32, DM.Reply) {
        var b = try r.encode()
        let rc = try dm.ioctl(r.command.request, &b)
        return (-rc, DM.Reply(b))
    }

    func table(_ fds: [Int32], clusterLog: Int = 11, sectors: UInt64 = 16 * 2048) -> [DM.Target] {
        [DM.Target(length: sectors, type: "ploop", params: DMPloop.Table(clusterLog: clusterLog, fds: fds).params)]
    }

    func create(_ name: String, minor: UInt32) throws -> Int32 {
        try send(DM.Request(.devCreate, name: name, flags: .persistentDevice, dev: DM.encodeDev(major: 253, minor: minor))).0
    }

    @Test func lifecycleOfAPloopDevice() throws {
        let base = try image("root.hds", inUse: false)
        let top = try image("root.hds.{5fbaabe3}")
        let fdBase = open(base, O_RDONLY)
        let fdTop = open(top, O_RDWR)
        #expect(try create("ploop1000", minor: 1000) == 0)
        #expect(try send(DM.Request(.tableLoad, name: "ploop1000", targets: table([fdBase, fdTop]))).0 == 0)
        // User space closes its copies once the table is loaded: the target keeps its own.
        close(fdBase)
        close(fdTop)
        let (rc, info) = try send(DM.Request(.devSuspend, name: "ploop1000"))  // resume: the table goes live
        #expect(rc == 0)
        #expect(info.flags.contains(.activePresent) && !info.flags.contains(.inactivePresent) && !info.flags.contains(.suspend))
        #expect(DM.decodeDev(info.dev) == (253, 1000))
        #expect(info.eventNumber == 1)

        let list = try send(DM.Request(.listDevices)).1.devices()
        #expect(list.map(\.name) == ["ploop1000"])
        let status = try send(DM.Request(.tableStatus, name: "ploop1000")).1.targets()
        #expect(status == [DM.Target(length: 16 * 2048, type: "ploop", params: "2 v2 2048 o")])
        #expect(try DMPloop.Status(parsing: status[0].params).deltas == 2)

        func name(_ l: Int) throws -> String? {
            let (rc, r) = try send(DM.Request(.targetMessage, name: "ploop1000", message: DMPloop.Message.getImageName(level: l).text))
            #expect(rc == 0)
            return r.messageResponse
        }
        #expect(try name(0) == base)
        #expect(try name(1) == top)
        #expect(try name(2) == "")

        // noresume: the next resume fails with EAGAIN until it is lifted; setting it twice: EBUSY.
        #expect(try send(DM.Request(.targetMessage, name: "ploop1000", message: "set_noresume 1")).0 == 0)
        #expect(try send(DM.Request(.targetMessage, name: "ploop1000", message: "set_noresume 1")).0 == EBUSY)
        #expect(try send(DM.Request(.tableStatus, name: "ploop1000")).1.targets().first?.params == "2 v2 2048 n")
        #expect(try send(DM.Request(.devSuspend, name: "ploop1000", flags: .suspend)).1.flags.contains(.suspend))
        #expect(try send(DM.Request(.devSuspend, name: "ploop1000")).0 == EAGAIN)
        #expect(try send(DM.Request(.targetMessage, name: "ploop1000", message: "set_noresume 0")).0 == 0)
        #expect(try send(DM.Request(.devSuspend, name: "ploop1000")).0 == 0)

        // Held open (a mounted file system): remove is refused.
        dm.hold("ploop1000", 1)
        let (busy, held) = try send(DM.Request(.devStatus, name: "ploop1000"))
        #expect(busy == 0 && held.openCount == 1)
        #expect(try send(DM.Request(.devRemove, name: "ploop1000")).0 == EBUSY)
        dm.hold("ploop1000", -1)
        #expect(try send(DM.Request(.devRemove, name: "ploop1000")).0 == 0)
        #expect(try send(DM.Request(.listDevices)).1.devices().isEmpty)
        #expect(try send(DM.Request(.devStatus, name: "ploop1000")).0 == ENXIO)
    }

    @Test func theConstructorsRefusals() throws {
        #expect(try create("ploop2000", minor: 2000) == 0)
        #expect(try create("ploop2000", minor: 2001) == EBUSY)
        #expect(try create("other", minor: 2000) == EBUSY)
        func load(_ paths: [(String, Int32)], clusterLog: Int = 11, sectors: UInt64 = 16 * 2048, readOnly: Bool = false) throws -> Int32 {
            let fds = paths.map { open($0.0, $0.1) }
            defer { fds.forEach { close($0) } }
            return try send(DM.Request(.tableLoad, name: "ploop2000", flags: readOnly ? .readOnly : [], targets: table(fds, clusterLog: clusterLog, sectors: sectors))).0
        }
        let good = try image("good")
        let notInUse = try image("closed", inUse: false)
        let v1 = try image("v1", version: .v1)
        let small = try image("small", clusters: 4)
        let big = try image("big", clusters: 64, inUse: false)
        let k64 = try image("k64", inUse: false, clusterSectors: 128)
        #expect(try load([(good, O_RDWR)]) == 0)
        #expect(try load([(notInUse, O_RDWR)]) == ENOLCK)
        #expect(try load([(notInUse, O_RDONLY)], readOnly: true) == 0)
        #expect(try load([(good, O_RDONLY)]) == EACCES)
        #expect(try load([(v1, O_RDWR)]) == FakeDeviceMapper.enotsupp)
        #expect(try load([(good, O_RDWR)], clusterLog: 10) == EINVAL)
        #expect(try load([(small, O_RDWR)]) == EBADSLT)
        #expect(try load([(big, O_RDONLY), (good, O_RDWR)]) == EBADSLT)
        #expect(try load([(k64, O_RDONLY), (good, O_RDWR)]) == EPROTO)
        #expect(try load([(notInUse, O_RDONLY), (good, O_RDWR)]) == 0)
        // BAT entries: one past the file's last whole cluster (EPROTO), one into the BAT's own
        // clusters (EXDEV: 64 KiB clusters, 20000 entries take two).
        func pointing(_ p: String, entry: UInt32) -> String {
            let fd = open(p, O_WRONLY)
            var e = entry.littleEndian
            _ = withUnsafeBytes(of: &e) { pwrite(fd, $0.baseAddress, 4, off_t(PloopSpec.headerSize + 4 * 3)) }
            close(fd)
            return p
        }
        #expect(try load([(pointing(try image("past"), entry: 7), O_RDWR)]) == EPROTO)
        let twoBATClusters = try image("bat2", clusters: 20000, clusterSectors: 128)
        #expect(try load([(twoBATClusters, O_RDWR)], clusterLog: 7, sectors: 20000 * 128) == 0)
        #expect(try load([(pointing(twoBATClusters, entry: 1), O_RDWR)], clusterLog: 7, sectors: 20000 * 128) == EXDEV)
        // A descriptor this process does not have.
        #expect(try send(DM.Request(.tableLoad, name: "ploop2000", targets: table([9999]))).0 == ENOENT)
        // Not alone in its table, unknown target type, no such device.
        let fd = open(good, O_RDWR)
        defer { close(fd) }
        let two = table([fd]) + [DM.Target(start: 16 * 2048, length: 8, type: "zero", params: "")]
        #expect(try send(DM.Request(.tableLoad, name: "ploop2000", targets: two)).0 == EINVAL)
        #expect(try send(DM.Request(.tableLoad, name: "ploop2000", targets: [DM.Target(length: 8, type: "nonesuch", params: "")])).0 == EINVAL)
        #expect(try send(DM.Request(.tableLoad, name: "ploop9", targets: table([fd]))).0 == ENXIO)
        // Messages: unknown verb, and one to a device without a live table.
        #expect(try send(DM.Request(.targetMessage, name: "ploop2000", message: "get_delta_name 0")).0 == FakeDeviceMapper.enotsupp)
        #expect(try send(DM.Request(.targetMessage, name: "ploop2000", message: "get_img_name 0")).0 == EINVAL)
        #expect(try send(DM.Request(.devRemove, name: "ploop2000")).0 == 0)
    }

    @Test func aRequestOfAnotherVersionOrSizeIsRefused() throws {
        var b = try DM.Request(.listDevices).encode()
        b[0] = 3  // version 3
        #expect(try dm.ioctl(DM.Command.listDevices.request, &b) == -EINVAL)
        var small = try DM.Request(.listDevices).encode()
        small[12] = 8; small[13] = 0; small[14] = 0; small[15] = 0  // data_size below the header
        #expect(try dm.ioctl(DM.Command.listDevices.request, &small) == -EINVAL)
        var other = try DM.Request(.listDevices).encode()
        #expect(try dm.ioctl(0x4018_5000, &other) == -ENOTTY)
    }

    @Test func anAnswerThatDoesNotFitSaysSo() throws {
        for m in 0..<UInt32(40) { #expect(try create("ploop-with-a-long-name-\(m)", minor: 3000 + m) == 0) }
        let (rc, r) = try send(DM.Request(.listDevices, bufferSize: 512))
        #expect(rc == 0 && r.bufferFull)
        let all = try send(DM.Request(.listDevices, bufferSize: 64 << 10)).1
        #expect(!all.bufferFull)
        #expect(try all.devices().count == 40)
    }
}
