import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopKernel
import PloopTestSupport
import Testing

/// `DMPloopBackend` over the fake device-mapper: mount, block I/O, info, list and umount as the
/// original's 9.x sequences them, the in-use mark set by us before the load and cleared after the
/// removal, a refused load undone, and what dm-ploop cannot do said so.
struct DMPloopBackendTests {
    static let cs: UInt32 = 128
    static var cb: Int { Int(cs) * 512 }
    let dir: ScratchDirectory
    let fake = FakeDeviceMapper()
    let backend: DMPloopBackend

    init() throws {
        dir = try ScratchDirectory("ploop-dmb")
        backend = DMPloopBackend(fake: fake, umountTimeout: 0.2)
    }

    func image(_ name: String, clusters: UInt64, fill: [UInt64] = [], tag: UInt8 = 1, version: FormatVersion = .v2) throws -> String {
        let p = dir.file(name)
        try Offline.initialize(.init(path: p, sizeSectors: clusters * UInt64(Self.cs), clusterSectors: Self.cs, version: version))
        if !fill.isEmpty {
            let img = try Ploop1Image(file: try ImagePath.open(p, write: true), writable: true)
            for c in fill {
                try Self.cluster(c, tag).withUnsafeBytes { try img.write(cluster: ClusterIndex(c), data: $0) }
            }
            try img.close()
        }
        return p
    }

    static func cluster(_ c: UInt64, _ tag: UInt8) -> [UInt8] {
        (0..<cb).map { UInt8(truncatingIfNeeded: Int(c) &* 31 &+ $0 &* 7 &+ Int(tag)) }
    }

    static func inUse(_ path: String) throws -> Bool {
        try Ploop1Image(file: try ImagePath.open(path, write: false), writable: false).header.inUse
    }

    func readAll(_ io: any DeviceIO, _ size: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: size)
        try out.withUnsafeMutableBytes { try io.read(into: $0, at: 0) }
        return out
    }

    @Test func mountWriteReadUmount() throws {
        let n: UInt64 = 32
        let base = try image("root.hds", clusters: n, fill: [0, 1, 2, 20], tag: 1)
        let top = try image("root.hds.{7f3c}", clusters: n)
        var ref = [UInt8](repeating: 0, count: Int(n) * Self.cb)
        for c in [0, 1, 2, 20] as [Int] { ref.replaceSubrange(c * Self.cb..<(c + 1) * Self.cb, with: Self.cluster(UInt64(c), 1)) }

        let dev = try backend.mount(MountRequest(images: [base, top]))
        #expect(dev.hasPrefix("/dev/mapper/ploop"))
        let minor = Int(dev.dropFirst("/dev/mapper/ploop".count))!
        #expect((1000...66534).contains(minor))
        #expect(fake.commands.withLock { $0.map(\.0) } == [.listDevices, .devCreate, .tableLoad, .devSuspend])
        // The top is ours to mark, before the load; the base is left alone.
        #expect(try Self.inUse(top))
        #expect(try !Self.inUse(base))

        let io = try backend.openIO(dev)
        let data = (0..<3 * Self.cb).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        try data.withUnsafeBytes { try io.write($0, at: UInt64(Self.cb / 2)) }
        try io.flush()
        ref.replaceSubrange(Self.cb / 2..<Self.cb / 2 + data.count, with: data)
        #expect(try readAll(io, ref.count) == ref)

        let info = try backend.info(dev)
        #expect(info.backend == "dm-ploop")
        #expect(info.sizeBytes == n * UInt64(Self.cb))
        #expect(info.clusterBytes == Self.cb)
        #expect(info.levels.map(\.path) == [base, top])
        #expect(info.levels.map(\.readOnly) == [true, false])
        #expect(try backend.list().map(\.device) == [dev])

        try backend.umount(dev)
        #expect(try backend.list().isEmpty)
        #expect(try !Self.inUse(top))
        for p in [base, top] {
            var o = Checker.Options()
            o.force = true
            o.readOnly = true
            #expect(try Checker.check(path: p, options: o).status == .ok, "\(p)")
        }
        // What was written is in the images: the in-process model reads it back.
        let again = InProcessBackend()
        let d = try again.mount(MountRequest(images: [base, top], readOnly: true))
        #expect(try readAll(try again.openIO(d), ref.count) == ref)
        try again.umount(d)
    }

    /// Online snapshot: suspend, the old top's mark cleared, reload with the new top, resume.
    @Test func snapshotThenGrowWhileRunning() throws {
        let n: UInt64 = 16
        let base = try image("root.hds", clusters: n)
        let dev = try backend.mount(MountRequest(images: [base]))
        let io = try backend.openIO(dev)
        let a = [UInt8](repeating: 0xA1, count: Self.cb)
        try a.withUnsafeBytes { try io.write($0, at: 0) }
        fake.commands.withLock { $0 = [] }

        let top = dir.file("root.hds.{1e2f}")
        try backend.snapshot(dev, newDelta: top)
        let changes = fake.commands.withLock { $0.map(\.0) }.filter { ![.tableStatus, .targetMessage, .listDevices, .devStatus].contains($0) }
        #expect(changes == [.devSuspend, .tableLoad, .devSuspend])
        #expect(try backend.info(dev).levels.map(\.path) == [base, top])
        #expect(try !Self.inUse(base))
        #expect(try Self.inUse(top))
        // New writes land in the new top; the base keeps what it had.
        let io2 = try backend.openIO(dev)
        let b = [UInt8](repeating: 0xB2, count: 4096)
        try b.withUnsafeBytes { try io2.write($0, at: 8192) }
        try b.withUnsafeBytes { try io2.write($0, at: UInt64(5 * Self.cb)) }
        var ref = [UInt8](repeating: 0, count: Int(n) * Self.cb)
        ref.replaceSubrange(0..<Self.cb, with: a)
        ref.replaceSubrange(8192..<8192 + 4096, with: b)
        ref.replaceSubrange(5 * Self.cb..<5 * Self.cb + 4096, with: b)
        #expect(try readAll(io2, ref.count) == ref)

        // Grow: resize, then a table with the new length.
        try backend.grow(dev, sizeSectors: 2 * n * UInt64(Self.cs))
        #expect(try backend.info(dev).sizeBytes == 2 * n * UInt64(Self.cb))
        let io3 = try backend.openIO(dev)
        let c = [UInt8](repeating: 0xC3, count: Self.cb)
        try c.withUnsafeBytes { try io3.write($0, at: UInt64(2 * Int(n) - 1) * UInt64(Self.cb)) }
        ref += [UInt8](repeating: 0, count: Int(n) * Self.cb)
        ref.replaceSubrange((2 * Int(n) - 1) * Self.cb..<2 * Int(n) * Self.cb, with: c)
        #expect(try readAll(io3, ref.count) == ref)
        #expect(throws: DeviceError.cannotShrink(fromSectors: 2 * n * UInt64(Self.cs), toSectors: n * UInt64(Self.cs))) {
            try backend.grow(dev, sizeSectors: n * UInt64(Self.cs))
        }

        try backend.umount(dev)
        #expect(try !Self.inUse(top))
        var o = Checker.Options()
        o.force = true
        o.readOnly = true
        for p in [base, top] { #expect(try Checker.check(path: p, options: o).status == .ok, "\(p)") }
        let again = InProcessBackend()
        let d = try again.mount(MountRequest(images: [base, top], readOnly: true))
        #expect(try readAll(try again.openIO(d), ref.count) == ref)
        try again.umount(d)
        // The base alone: only what was written before the snapshot.
        let d0 = try again.mount(MountRequest(images: [base], readOnly: true))
        var before = [UInt8](repeating: 0, count: Int(n) * Self.cb)
        before.replaceSubrange(0..<Self.cb, with: a)
        #expect(try readAll(try again.openIO(d0), before.count) == before)
        try again.umount(d0)
    }

    /// A snapshot whose reload is refused leaves the old table running, the old top marked, and
    /// no new file; a new delta path that exists is refused before anything.
    @Test func aRefusedSnapshotIsUndone() throws {
        let base = try image("root.hds", clusters: 16)
        let dev = try backend.mount(MountRequest(images: [base]))
        let io = try backend.openIO(dev)
        let a = [UInt8](repeating: 0x5A, count: 4096)
        try a.withUnsafeBytes { try io.write($0, at: 0) }
        let top = dir.file("root.hds.{99}")
        fake.fail(.tableLoad, errno: EINVAL)
        fake.commands.withLock { $0 = [] }
        #expect(throws: DeviceError.self) { try backend.snapshot(dev, newDelta: top) }
        let changes = fake.commands.withLock { $0.map(\.0) }.filter { ![.tableStatus, .targetMessage, .listDevices, .devStatus].contains($0) }
        #expect(changes == [.devSuspend, .tableLoad, .devSuspend])
        #expect(!FileManager.default.fileExists(atPath: top))
        #expect(try backend.info(dev).levels.map(\.path) == [base])
        #expect(try Self.inUse(base))
        var got = [UInt8](repeating: 0, count: 4096)
        try got.withUnsafeMutableBytes { try backend.openIO(dev).read(into: $0, at: 0) }
        #expect(got == a)

        let taken = dir.file("taken")
        _ = FileManager.default.createFile(atPath: taken, contents: Data([1, 2, 3]))
        #expect(throws: DeviceError.self) { try backend.snapshot(dev, newDelta: taken) }
        #expect(try Data(contentsOf: URL(fileURLWithPath: taken)) == Data([1, 2, 3]))
        try backend.umount(dev)
        #expect(try !Self.inUse(base))
    }

    /// A device still open when umount starts is waited for, as the original polls.
    @Test func umountWaitsForTheLastHolder() throws {
        let top = try image("t", clusters: 8)
        let patient = DMPloopBackend(fake: fake, umountTimeout: 10)
        let dev = try patient.mount(MountRequest(images: [top]))
        let name = String(dev.dropFirst("/dev/mapper/".count))
        fake.hold(name, 1)
        let release = Thread { [fake] in
            Thread.sleep(forTimeInterval: 0.3)
            fake.hold(name, -1)
        }
        release.start()
        try patient.umount(dev)
        let removes = fake.commands.withLock { $0.filter { $0.0 == .devRemove }.count }
        #expect(removes >= 2)
        #expect(try !Self.inUse(top))
    }

    /// The table lines and messages, as the kernel receives them: the cluster log, one
    /// descriptor per level (base first), the device length; the levels asked by `get_img_name`.
    @Test func theTextsSent() throws {
        let base = try image("b", clusters: 16)
        let top = try image("t", clusters: 16)
        let dev = try backend.mount(MountRequest(images: [base, top]))
        let load = try #require(fake.texts.withLock { $0.first })
        let words = load.split(separator: " ").map(String.init)
        // 0 <length> ploop <log> <fd base> <fd top>; 64 KiB clusters: log 7.
        #expect(words.count == 6 && words[0] == "0" && words[1] == "\(16 * Int(Self.cs))" && words[2] == "ploop" && words[3] == "7")
        #expect(Int32(words[4]) != nil && Int32(words[5]) != nil && words[4] != words[5])
        fake.texts.withLock { $0 = [] }
        _ = try backend.info(dev)
        #expect(fake.texts.withLock { $0 } == ["get_img_name 0", "get_img_name 1"])
        fake.texts.withLock { $0 = [] }
        try backend.grow(dev, sizeSectors: 32 * UInt64(Self.cs))
        let grow = fake.texts.withLock { $0 }
        #expect(grow.first == "get_img_name 0" && grow.contains("resize \(32 * Int(Self.cs))"))
        #expect(grow.last?.hasPrefix("0 \(32 * Int(Self.cs)) ploop 7 ") == true)
        try backend.umount(dev)
    }

    /// What each refusal says: what is wrong and what to do.
    @Test func errnoWording() throws {
        let top = try image("t", clusters: 8)
        func mountFailing(_ cmd: DM.Command, _ e: Int32) -> String {
            fake.fail(cmd, errno: e)
            do {
                let d = try backend.mount(MountRequest(images: [top]))
                try? backend.umount(d)
                return "mounted"
            } catch { return "\(error)" }
        }
        #expect(mountFailing(.tableLoad, EINVAL).contains("modprobe dm-ploop"))
        #expect(mountFailing(.tableLoad, ENOLCK).contains("not marked in use"))
        #expect(mountFailing(.tableLoad, FakeDeviceMapper.enotsupp).contains("ploop convert -v 2"))
        #expect(mountFailing(.devCreate, ENOTTY).contains("does not take device-mapper requests"))
        #expect(mountFailing(.devCreate, EPERM).contains("needs root"))
        #expect(mountFailing(.listDevices, EIO).contains("Input/output error"))
        // Every refused mount left the image as it was: not marked in use.
        #expect(try !Self.inUse(top))
        // A device still open when the wait ends (EBUSY), a message the target lacks (ENOTSUPP).
        let dev = try backend.mount(MountRequest(images: [top]))
        fake.hold(String(dev.dropFirst("/dev/mapper/".count)), 1)
        #expect {
            try backend.umount(dev)
        } throws: { e in
            "\(e)".contains("it is open: unmount what uses it") && "\(e)".contains("still open after 0.2 s")
        }
        fake.hold(String(dev.dropFirst("/dev/mapper/".count)), -1)
        fake.failMessage("flip_upper_deltas", errno: FakeDeviceMapper.enotsupp)
        try backend.snapshot(dev, newDelta: dir.file("t.1"))
        #expect {
            _ = try backend.merge(dev, levels: 0...1, progress: nil)
        } throws: { e in
            "\(e)".contains("flip_upper_deltas") && "\(e)".contains("has no such message")
        }
        try backend.umount(dev)
        #expect(try !Self.inUse(top) && !Self.inUse(dir.file("t.1")))
        #expect(throws: DeviceError.noSuchDevice("/dev/mapper/ploop4242")) { try backend.umount("/dev/mapper/ploop4242") }
        #expect(throws: DeviceError.badDeviceName("/dev/sda")) { try backend.info("/dev/sda") }
    }

    /// `--backend auto` takes dm-ploop where device-mapper lists the ploop target.
    @Test func availability() {
        #expect(DMPloopBackend.unavailableReason(transport: fake) == nil)
        let none = DMPloopBackend.unavailableReason(transport: SystemDMTransport(control: dir.file("no-control")))
        #expect(none?.contains("no device-mapper here") == true)
        struct NoPloop: DMTransport {
            func ioctl(_ request: UInt, _ buffer: inout [UInt8]) throws(DeviceError) -> Int32 {
                // A list with "linear" only.
                buffer[312] = 0
                let name = Array("linear".utf8)
                buffer.replaceSubrange(328..<328 + name.count, with: name)
                return 0
            }
        }
        let why = DMPloopBackend.unavailableReason(transport: NoPloop())
        #expect(why?.contains("'ploop' is not registered") == true && why?.contains("linear") == true)
    }

    @Test func aRefusedLoadIsUndone() throws {
        // A base larger than the top: our checks pass it, dm-ploop's constructor does not (EBADSLT).
        let base = try image("big", clusters: 64)
        let top = try image("small", clusters: 32)
        #expect(throws: DeviceError.self) { try backend.mount(MountRequest(images: [base, top])) }
        #expect(fake.commands.withLock { $0.map(\.0) } == [.listDevices, .devCreate, .tableLoad, .devRemove])
        #expect(try backend.list().isEmpty)
        #expect(try !Self.inUse(top))
    }

    @Test func versionOneIsRefusedUntouched() throws {
        let v1 = try image("old.hdd", clusters: 16, version: .v1)
        let before = try Data(contentsOf: URL(fileURLWithPath: v1))
        #expect {
            try backend.mount(MountRequest(images: [v1]))
        } throws: { e in
            "\(e)".contains("version 2 images only") && "\(e)".contains("ploop convert -v 2")
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: v1)) == before)
        #expect(fake.commands.withLock { $0.isEmpty })
    }

    /// What the device reads, cluster by cluster, for levels holding `fills` (base first) with
    /// tags 1, 2, 3…: the top-most level's copy wins.
    static func reference(_ n: UInt64, _ fills: [[UInt64]]) -> [UInt8] {
        var ref = [UInt8](repeating: 0, count: Int(n) * cb)
        for (i, f) in fills.enumerated() {
            for c in f { ref.replaceSubrange(Int(c) * cb..<(Int(c) + 1) * cb, with: cluster(c, UInt8(i + 1))) }
        }
        return ref
    }

    /// The top merged into the level below as the reverse merge: the file below grown to the
    /// device (its displaced cluster told with update_delta_index), both upper files writable in a
    /// reload, set_noresume 1, suspend, flip_upper_deltas, set_noresume 0, resume, merge. The file
    /// below survives, holding every cluster, marked as the top; the old top's mark is cleared;
    /// no cluster of the old top was left shadowed in the file below (the fake's EEXIST check).
    @Test func topMergeIsTheReverseMerge() throws {
        // 64 KiB clusters: 16384 BAT entries per cluster, so a top of 16400 clusters needs a
        // second BAT cluster in the file below, where its first data block is.
        let n: UInt64 = 16400
        let fills: [[UInt64]] = [[0, 3, 9], [1, 2, 5], [2, 5, 7, 16399]]
        let base = try image("root.hds", clusters: 16, fill: fills[0], tag: 1)
        let mid = try image("root.hds.{1}", clusters: 16, fill: fills[1], tag: 2)
        let top = try image("root.hds.{2}", clusters: n, fill: fills[2], tag: 3)
        let dev = try backend.mount(MountRequest(images: [base, mid, top]))
        let io = try backend.openIO(dev)
        var ref = Self.reference(n, fills)
        // A write while running lands in the top and must survive the merge.
        let w = [UInt8](repeating: 0xE7, count: 4096)
        try w.withUnsafeBytes { try io.write($0, at: UInt64(3 * Self.cb + 8192)) }
        ref.replaceSubrange(3 * Self.cb + 8192..<3 * Self.cb + 8192 + 4096, with: w)
        fake.texts.withLock { $0 = [] }
        fake.commands.withLock { $0 = [] }

        let removed = try backend.merge(dev, levels: 1...2, progress: nil)
        #expect(removed == [top])
        let texts = fake.texts.withLock { $0 }.filter { !$0.hasPrefix("get_img_name") }
        #expect(texts.first?.hasPrefix("update_delta_index 1 1:") == true, "\(texts)")
        let verbs = texts.map { $0.split(separator: " ").first.map(String.init) ?? "" }.filter { $0 != "update_delta_index" }
        #expect(verbs == ["0", "set_noresume", "flip_upper_deltas", "set_noresume", "merge"], "\(texts)")
        #expect(texts.contains("set_noresume 1") && texts.contains("set_noresume 0"))
        // The reload carries three descriptors; the device was suspended for it and again for the flip.
        let changes = fake.commands.withLock { $0.map(\.0) }.filter { ![.tableStatus, .targetMessage, .listDevices, .devStatus].contains($0) }
        #expect(changes == [.devSuspend, .tableLoad, .devSuspend, .devSuspend, .devSuspend])
        #expect(try backend.info(dev).levels.map(\.path) == [base, mid])
        #expect(try Self.sample(try backend.openIO(dev)) == Self.sample(ref))
        #expect(try Self.inUse(mid))
        #expect(try !Self.inUse(top))
        #expect(!FileManager.default.fileExists(atPath: Offline.reverseMergeMarker(of: mid)))
        try backend.umount(dev)
        #expect(try !Self.inUse(mid))
        var o = Checker.Options()
        o.force = true
        o.readOnly = true
        #expect(try Checker.check(path: mid, options: o).status == .ok)
        let again = InProcessBackend()
        let d = try again.mount(MountRequest(images: [base, mid], readOnly: true))
        #expect(try Self.sample(try again.openIO(d)) == Self.sample(ref))
        try again.umount(d)
    }

    /// The first 16 clusters and the last of a 16400-cluster device (reading all 1 GiB is slow).
    static func sample(_ io: any DeviceIO) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 17 * cb)
        try out.withUnsafeMutableBytes { try io.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<16 * cb]), at: 0) }
        try out.withUnsafeMutableBytes { try io.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[(16 * cb)...]), at: 16399 * UInt64(cb)) }
        return out
    }

    static func sample(_ ref: [UInt8]) -> [UInt8] { Array(ref[0..<16 * cb] + ref[16399 * cb..<16400 * cb]) }

    /// A merge stopped after its flip leaves the device running its files with the two upper
    /// ones swapped; finishSwappedMerge completes it with the copy up. A merge refused before
    /// the flip leaves the old top serving, marked, and the file below unmarked.
    @Test func aStoppedReverseMergeIsFinishedOrUndone() throws {
        let n: UInt64 = 16
        let fills: [[UInt64]] = [[0, 1], [1, 2, 3]]
        let base = try image("b", clusters: n, fill: fills[0], tag: 1)
        let top = try image("b.{1}", clusters: n, fill: fills[1], tag: 2)
        let dev = try backend.mount(MountRequest(images: [base, top]))
        let ref = Self.reference(n, fills)

        let marker = Offline.reverseMergeMarker(of: base)
        fake.failMessage("flip_upper_deltas", errno: EBUSY)
        #expect(throws: DeviceError.self) { _ = try backend.merge(dev, levels: 0...1, progress: nil) }
        #expect(try backend.info(dev).levels.map(\.path) == [base, top])
        #expect(try Self.inUse(top))
        #expect(try !Self.inUse(base))
        // Undone before the flip: the old top's copies are the newer ones again, no marker says otherwise.
        #expect(!FileManager.default.fileExists(atPath: marker))
        #expect(try readAll(try backend.openIO(dev), ref.count) == ref)

        fake.failMessage("merge", errno: EINTR)
        #expect(throws: DeviceError.self) { _ = try backend.merge(dev, levels: 0...1, progress: nil) }
        #expect(try backend.info(dev).levels.map(\.path) == [top, base])
        #expect(try readAll(try backend.openIO(dev), ref.count) == ref)
        // Past the flip: the marker tells a recovery to keep the file below's clusters.
        #expect(FileManager.default.fileExists(atPath: marker))
        #expect(try backend.finishSwappedMerge(dev) == [top])
        #expect(!FileManager.default.fileExists(atPath: marker))
        #expect(try backend.info(dev).levels.map(\.path) == [base])
        #expect(try readAll(try backend.openIO(dev), ref.count) == ref)
        try backend.umount(dev)
        #expect(try !Self.inUse(base))
        #expect(try !Self.inUse(top))
    }

    /// Copy with write tracking as the original's 9.x sets it up: an error table, the twin
    /// `<name>.tracking` made on the same images, a tracking table over it, `tracking_start`; a
    /// write through the device is handed out as its block and BAT sector; stop puts the ploop
    /// table back and removes the twin. A refused step puts the ploop table back too.
    @Test func copyTrackingSequence() throws {
        let n: UInt64 = 16
        let top = try image("t", clusters: n, fill: [1], tag: 1)
        let dev = try backend.mount(MountRequest(images: [top]))
        let name = String(dev.dropFirst("/dev/mapper/".count))
        fake.commands.withLock { $0 = [] }
        fake.texts.withLock { $0 = [] }
        let end = try backend.trackInit(dev)
        #expect(end == UInt64(try ImagePath.open(top, write: false).size()))
        let changes = fake.commands.withLock { $0 }.filter { ![.tableStatus, .targetMessage, .listDevices, .devStatus].contains($0.0) }
        #expect(changes.map(\.0) == [.devSuspend, .tableLoad, .devCreate, .tableLoad, .devSuspend, .tableLoad, .devSuspend])
        #expect(changes.map(\.1) == [name, name, name + ".tracking", name + ".tracking", name + ".tracking", name, name])
        let loads = fake.texts.withLock { $0 }.filter { $0.hasPrefix("0 ") }
        #expect(loads.count == 3 && loads[0] == "0 \(n * UInt64(Self.cs)) error " && loads[1].contains(" ploop 7 "))
        #expect(loads[2] == "0 \(n * UInt64(Self.cs)) tracking \(Self.cs) /dev/mapper/\(name).tracking")
        #expect(fake.texts.withLock { $0 }.last == "tracking_start")
        // The device still answers, as tracked (and refuses to change its table meanwhile).
        #expect(try backend.info(dev).state == .track)
        #expect(throws: DeviceError.busy(.track)) { try backend.snapshot(dev, newDelta: dir.file("t.1")) }

        // A write to cluster 5: its new block and the BAT sector of entry 5 are handed out.
        let io = try backend.openIO(dev)
        let w = [UInt8](repeating: 0x77, count: 4096)
        try w.withUnsafeBytes { try io.write($0, at: 5 * UInt64(Self.cb) + 4096) }
        var got: [Range<UInt64>] = []
        while let r = try backend.trackRead(dev) { got.append(r) }
        let image = try Ploop1Image(file: try ImagePath.open(top, write: false), writable: false, allowDirty: true)
        let block = try #require(image.block(of: ClusterIndex(5)))
        let bat = image.header.layout.entryOffset(ClusterIndex(5)) / 512 * 512
        #expect(got == [UInt64(block.value) * UInt64(Self.cb)..<UInt64(block.value + 1) * UInt64(Self.cb), bat..<bat + 512])
        // Written again, not read yet: stop is refused, then allowed once it is read.
        try w.withUnsafeBytes { try io.write($0, at: 5 * UInt64(Self.cb)) }
        #expect(throws: DeviceError.unreadExtents) { try backend.trackStop(dev) }
        while try backend.trackRead(dev) != nil {}
        fake.commands.withLock { $0 = [] }
        try backend.trackStop(dev)
        let back = fake.commands.withLock { $0 }.filter { ![.tableStatus, .targetMessage, .listDevices, .devStatus].contains($0.0) }
        #expect(back.map(\.0) == [.devSuspend, .devSuspend, .tableLoad, .devSuspend, .devRemove])
        #expect(back.map(\.1) == [name, name + ".tracking", name, name, name + ".tracking"])
        #expect(try backend.info(dev).state == .off)
        #expect(try backend.info(dev).levels.map(\.path) == [top])

        // The twin's table refused: the device runs its ploop table again, no twin is left.
        fake.fail(.devCreate, errno: ENOMEM)
        #expect(throws: DeviceError.self) { _ = try backend.trackInit(dev) }
        #expect(try backend.info(dev).state == .off)
        #expect(try backend.list().map(\.device) == [dev])
        var cluster5 = [UInt8](repeating: 0, count: 4096)
        try cluster5.withUnsafeMutableBytes { try backend.openIO(dev).read(into: $0, at: 5 * UInt64(Self.cb)) }
        #expect(cluster5 == w)
        try backend.umount(dev)
        #expect(try !Self.inUse(top))
    }

    @Test func whatIsNotThereSaysSo() throws {
        let raw = dir.file("raw")
        #expect(FileManager.default.createFile(atPath: raw, contents: Data(count: 8 * Self.cb)))
        let rawDev = try backend.mount(MountRequest(images: [raw], baseFormat: .raw, clusterSectors: Self.cs))
        try backend.snapshot(rawDev, newDelta: dir.file("raw.1"))
        #expect {
            _ = try backend.merge(rawDev, levels: 0...1, progress: nil)
        } throws: { e in
            guard case DeviceError.notSupported(let why) = e else { return false }
            return why.contains("raw base") && why.contains("EBADSLT") && why.contains("offline")
        }
        #expect(try backend.info(rawDev).levels.count == 2)
        try backend.umount(rawDev)
        let top = try image("t", clusters: 8)
        let dev = try backend.mount(MountRequest(images: [top]))
        try backend.snapshot(dev, newDelta: dir.file("t.1"))
        #expect {
            _ = try backend.balloon(dev, inflate: true, keepIntact: false)
        } throws: { e in
            "\(e)".contains("no balloon ioctls")
        }
        // Held open: the removal is refused, and the mark stays while the device runs.
        fake.hold(String(dev.dropFirst("/dev/mapper/".count)), 1)
        #expect(throws: DeviceError.self) { try backend.umount(dev) }
        #expect(try Self.inUse(dir.file("t.1")))
        fake.hold(String(dev.dropFirst("/dev/mapper/".count)), -1)
        try backend.umount(dev)
        #expect(try !Self.inUse(dir.file("t.1")))
        #expect(try !Self.inUse(top))
        #expect(throws: DeviceError.noSuchDevice(dev)) { try backend.info(dev) }
    }
}
