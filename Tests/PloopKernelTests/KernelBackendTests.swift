import CPloopSys
import Foundation
import PloopCopy
import PloopDevice
import PloopFormat
import PloopImage
import PloopKernel
import PloopTestSupport
import Synchronization
import Testing

/// A transport that records each request with a copy of its argument bytes and answers from a
/// script (or, by default, with the fake driver).
final class RecordingTransport: KernelTransport, @unchecked Sendable {
    struct Call {
        var op: KernelIoctl
        var device: Int
        /// The argument bytes as sent (the fixed part and its tail), or the pointer's value.
        var bytes: [UInt8]
        var value: UInt
    }

    let sysfsRoot: String
    let inner: (any KernelTransport)?
    private let lock = NSLock()
    private(set) var calls: [Call] = []
    /// Answers by request: an errno to fail with, or a closure writing the reply.
    var failures: [KernelIoctl: Int32] = [:]
    var replies: [KernelIoctl: (UnsafeMutableRawPointer) -> Void] = [:]

    init(sysfsRoot: String, inner: (any KernelTransport)? = nil) {
        self.sysfsRoot = sysfsRoot
        self.inner = inner
    }

    /// How many argument bytes to record per request: the fixed size from the request's _IOC
    /// size field, plus the tail the fixed part announces.
    static func length(_ op: KernelIoctl, _ p: UnsafeMutableRawPointer) -> Int {
        let fixed = Int((op.request >> 16) & 0x3fff)
        switch op {
        case .addDelta, .snapshot, .replaceDelta: return 120
        case .updateIndex: return 8 + 8 * Int(p.load(as: UInt32.self))
        case .freeBlocks, .fbGet, .relocBlocks: return 16 + 16 * Int(p.load(as: UInt32.self))
        default: return fixed
        }
    }

    func ioctl(device index: Int, request: UInt, argument: UnsafeMutableRawPointer?) throws(DeviceError) -> Int32 {
        let op = KernelIoctl(request: request)!
        var call = Call(op: op, device: index, bytes: [], value: UInt(bitPattern: argument))
        if let p = argument, op != .fbFilter {
            call.bytes = Array(UnsafeRawBufferPointer(start: p, count: Self.length(op, p)))
        }
        lock.lock()
        calls.append(call)
        let failure = failures[op]
        let reply = replies[op]
        lock.unlock()
        if let failure { return -failure }
        if let reply, let p = argument {
            reply(p)
            return 0
        }
        return try inner?.ioctl(device: index, request: request, argument: argument) ?? 0
    }

    func openIO(device index: Int) throws(DeviceError) -> any DeviceIO {
        guard let inner else { throw .noSuchDevice(DeviceName.name(index)) }
        return try inner.openIO(device: index)
    }

    func ops() -> [KernelIoctl] { lock.lock(); defer { lock.unlock() }; return calls.map(\.op) }
    func last(_ op: KernelIoctl) -> Call? { lock.lock(); defer { lock.unlock() }; return calls.last { $0.op == op } }
}

extension Array where Element == UInt8 {
    func u32(_ o: Int) -> UInt32 { self[o..<o + 4].enumerated().reduce(0) { $0 | UInt32($1.element) << (8 * $1.offset) } }
    func u16(_ o: Int) -> UInt16 { UInt16(self[o]) | UInt16(self[o + 1]) << 8 }
    func s32(_ o: Int) -> Int32 { Int32(bitPattern: u32(o)) }
    func u64(_ o: Int) -> UInt64 { UInt64(u32(o)) | UInt64(u32(o + 4)) << 32 }
}

/// What `KernelBackend` sends, byte by byte, and how it reads the driver's errors.
struct KernelBackendBytesTests {
    static let cs: UInt32 = 128

    func images(_ dir: ScratchDirectory, _ names: [String]) throws -> [String] {
        try names.map { n in
            let p = dir.file(n)
            try Offline.initialize(.init(path: p, sizeSectors: 64 * UInt64(Self.cs), clusterSectors: Self.cs))
            return p
        }
    }

    @Test func mountSendsTheOriginalSequence() throws {
        let dir = try ScratchDirectory("ploop-kbytes")
        let paths = try images(dir, ["base", "top"])
        let fake = FakeKernel(lower: InProcessBackend(), sysfsRoot: dir.file("sys"))
        let t = RecordingTransport(sysfsRoot: fake.sysfsRoot, inner: fake)
        let be = KernelBackend(transport: t, umountTimeout: 1)
        let d = try be.mount(MountRequest(images: paths))
        #expect(d == "/dev/ploop0")
        #expect(t.ops() == [.getDevice, .addDelta, .addDelta, .start])
        // GETDEVICE goes to /dev/ploop0, as the manual allows; the rest to the chosen device.
        #expect(t.calls.map(\.device) == [0, 0, 0, 0])
        for (i, call) in t.calls.filter({ $0.op == .addDelta }).enumerated() {
            let b = call.bytes
            #expect(b.u32(0) == 2, "pctl_format PLOOP1")
            #expect(b.u32(4) == (i == 0 ? 1 : 0), "pctl_flags: RDONLY below the top")
            #expect(b.u32(8) == 7, "pctl_cluster_log of 128 sectors")
            #expect(b.u32(12) == 0, "pctl_size is 0 for ADD_DELTA")
            #expect(b.u16(16) == 1, "one chunk")
            #expect(b[18] == 0 && b[19] == 0 && b.u32(20) == 0, "level and mbz left zero")
            #expect(b.s32(24) > 2, "pctl_fd of the image")
            #expect(b.u32(28) == 0, "PLOOP_IO_AUTO")
            #expect(b.u32(32) == 0 && b.u32(36) == 0 && b.u64(40) == 0 && b.u64(48) == 0)
        }
        // The sysfs tree the fake keeps is what info reads.
        let info = try be.info(d)
        #expect(info.levels.map(\.path) == paths)
        #expect(info.levels.map(\.readOnly) == [true, false])
        #expect(info.clusterBytes == Int(Self.cs) * 512)
        #expect(info.backend == "kernel")
        try be.umount(d)
        #expect(Array(t.ops().suffix(2)) == [.stop, .clear])
        #expect(try be.list().isEmpty)
    }

    @Test func refusedDeltaIsUndoneTopDown() throws {
        let dir = try ScratchDirectory("ploop-kbytes")
        let paths = try images(dir, ["a", "b", "c"])
        let t = RecordingTransport(sysfsRoot: dir.file("sys"))
        t.replies[.getDevice] = { $0.storeBytes(of: UInt32(5 << 4), as: UInt32.self) }
        var added = 0
        t.replies[.addDelta] = { _ in added += 1 }
        t.failures[.start] = EINVAL
        let be = KernelBackend(transport: t)
        #expect(throws: DeviceError.self) { try be.mount(MountRequest(images: paths)) }
        #expect(t.ops() == [.getDevice, .addDelta, .addDelta, .addDelta, .start, .delDelta, .delDelta, .delDelta, .clear])
        #expect(t.calls.filter { $0.op == .delDelta }.map { $0.bytes.u32(0) } == [2, 1, 0])
        #expect(t.calls.dropFirst().allSatisfy { $0.device == 5 })
        #expect(added == 3)
        // Nothing was written to the images.
        for p in paths { #expect(try !ImageInfo.read(path: p).inUse) }
    }

    @Test func errnosBecomeClearErrors() throws {
        let dir = try ScratchDirectory("ploop-kbytes")
        let t = RecordingTransport(sysfsRoot: dir.file("sys"))
        let be = KernelBackend(transport: t)
        t.failures[.sync] = ENOTTY
        #expect(throws: DeviceError.unavailable("/dev/ploop1 does not know PLOOP_IOC_SYNC (ENOTTY): the loaded driver is too old, or this is not a ploop device")) {
            try be.sync("/dev/ploop1")
        }
        t.failures[.sync] = EPERM
        #expect(throws: DeviceError.unavailable("PLOOP_IOC_SYNC on /dev/ploop1: permission denied: run as root on the host (not inside a container)")) {
            try be.sync("/dev/ploop1")
        }
        // EBUSY names the maintenance in the way, asked with BALLOON keep-intact.
        t.failures[.sync] = EBUSY
        t.replies[.balloon] = { $0.storeBytes(of: MaintenanceState.merge.rawValue, as: UInt32.self) }
        #expect(throws: DeviceError.busy(.merge)) { try be.sync("/dev/ploop1") }
        let query = t.last(.balloon)!.bytes
        #expect(query[9] == 0 && query[10] == 2, "inflate 0, keep_intact 2 as the original")
        // TRACK_READ's EAGAIN is "nothing now"; TRACK_STOP's EBUSY in TRACK is "read them all".
        t.failures[.trackRead] = EAGAIN
        #expect(try be.trackRead("/dev/ploop1") == nil)
        t.failures[.trackStop] = EBUSY
        t.replies[.balloon] = { $0.storeBytes(of: MaintenanceState.track.rawValue, as: UInt32.self) }
        #expect(throws: DeviceError.unreadExtents) { try be.trackStop("/dev/ploop1") }
        t.failures[.trackRead] = ECONNABORTED
        #expect(throws: DeviceError.aborted) { try be.trackRead("/dev/ploop1") }
        #expect(throws: DeviceError.badDeviceName("/dev/ploopX")) { try be.sync("/dev/ploopX") }
        // FREEZE/THAW carry no argument; a driver without them says so.
        try be.freeze("/dev/ploop1")
        try be.thaw("/dev/ploop1")
        #expect(t.last(.freeze)?.value == 0 && t.last(.thaw)?.value == 0)
        t.failures[.freeze] = ENOTTY
        #expect(throws: DeviceError.unavailable("/dev/ploop1 does not know PLOOP_IOC_FREEZE (ENOTTY): the loaded driver is too old, or this is not a ploop device")) {
            try be.freeze("/dev/ploop1")
        }
    }

    @Test func freeBlockCallsFollowTheOriginal() throws {
        let dir = try ScratchDirectory("ploop-kbytes")
        let t = RecordingTransport(sysfsRoot: dir.file("sys"))
        let be = KernelBackend(transport: t)
        let kernelList = [FreeExtent(cluster: 3, block: 9, length: 2), FreeExtent(cluster: 8, block: 20, length: 1)]
        t.replies[.fbGet] = { p in
            let capacity = Int(p.load(as: UInt32.self))
            for (i, e) in kernelList.prefix(capacity).enumerated() {
                p.storeBytes(of: e.cluster, toByteOffset: 16 + 16 * i, as: UInt32.self)
                p.storeBytes(of: e.block, toByteOffset: 20 + 16 * i, as: UInt32.self)
                p.storeBytes(of: e.length, toByteOffset: 24 + 16 * i, as: UInt32.self)
            }
            p.storeBytes(of: UInt32(kernelList.count), as: UInt32.self)
        }
        #expect(try be.freeBlockList("/dev/ploop2") == kernelList)
        // The count first (capacity 0), then the extents (capacity 2).
        #expect(t.calls.filter { $0.op == .fbGet }.map { $0.bytes.u32(0) } == [0, 2])
        try be.filterFreeBlocks("/dev/ploop2", minLength: 7)
        #expect(t.last(.fbFilter)?.value == 7, "FBFILTER's minimum length is the argument's value")
        t.replies[.freeBlocks] = { $0.storeBytes(of: UInt32(65), toByteOffset: 4, as: UInt32.self) }
        #expect(try be.loadFreeBlocks("/dev/ploop2", level: 1, extents: kernelList) == 65)
        let fb = t.last(.freeBlocks)!.bytes
        #expect(fb.u32(0) == 2 && fb[8] == 1)
        #expect([fb.u32(16), fb.u32(20), fb.u32(24), fb.u32(32), fb.u32(36), fb.u32(40)] == [3, 9, 2, 8, 20, 1])
        t.replies[.relocBlocks] = { $0.storeBytes(of: UInt32(4), toByteOffset: 8, as: UInt32.self) }
        let cut = try be.relocateBlocks("/dev/ploop2", level: 1, allocHead: 65, extents: [RelocExtent(cluster: 40, block: 64, length: 1, free: true)])
        #expect(cut == 4)
        let rb = t.last(.relocBlocks)!.bytes
        #expect([rb.u32(0), rb.u32(8), UInt32(rb[12]), rb.u32(16), rb.u32(20), rb.u32(24), rb.u32(28)] == [1, 65, 1, 40, 64, 1, 1])
    }

    @Test func growSendsClustersWithTheClusterFlag() throws {
        let dir = try ScratchDirectory("ploop-kbytes")
        let paths = try images(dir, ["base"])
        let fake = FakeKernel(lower: InProcessBackend(), sysfsRoot: dir.file("sys"))
        let t = RecordingTransport(sysfsRoot: fake.sysfsRoot, inner: fake)
        let be = KernelBackend(transport: t, umountTimeout: 1)
        let d = try be.mount(MountRequest(images: paths))
        try be.grow(d, sizeSectors: 100 * UInt64(Self.cs))
        let g = t.last(.grow)!.bytes
        #expect(g.u32(4) == 8, "PLOOP_FLAG_CLUBLKS")
        #expect(g.u32(8) == 7)
        #expect(g.u32(12) == 100)
        #expect(g.u16(16) == 0, "no chunks for GROW")
        #expect(try be.info(d).sizeBytes == 100 * UInt64(Self.cs) * 512)
        #expect(throws: DeviceError.self) { try be.grow(d, sizeSectors: 10) }
        try be.umount(d)
    }

    /// A lower-range merge as the original does it: offline into the base, DEL_DELTA for each
    /// merged level, no MERGE; with the top, a final MERGE.
    @Test func lowerMergeUsesDelDeltaAndTopMergeUsesMerge() throws {
        let dir = try ScratchDirectory("ploop-kbytes")
        let paths = try images(dir, ["l0", "l1", "l2", "l3"])
        for (i, p) in paths.enumerated() {
            let img = try Ploop1Image(file: try ImagePath.open(p, write: true), writable: true)
            let data = DeviceContent.pattern(Int(Self.cs) * 512, seed: UInt64(i + 1))
            try data.withUnsafeBytes { try img.write(cluster: ClusterIndex(UInt64(i)), data: $0) }
            try img.close()
        }
        let fake = FakeKernel(lower: InProcessBackend(), sysfsRoot: dir.file("sys"))
        let t = RecordingTransport(sysfsRoot: fake.sysfsRoot, inner: fake)
        let be = KernelBackend(transport: t, umountTimeout: 1)
        let d = try be.mount(MountRequest(images: paths))
        let before = try DeviceContent.readAll(try be.openIO(d))
        let start = t.calls.count
        #expect(try be.merge(d, levels: 0...2, progress: nil) == [paths[1], paths[2]])
        let lowerOps = t.calls[start...].map(\.op).filter { $0 != .balloon }
        #expect(lowerOps == [.delDelta, .delDelta])
        #expect(t.calls[start...].filter { $0.op == .delDelta }.map { $0.bytes.u32(0) } == [1, 1])
        #expect(try DeviceContent.readAll(try be.openIO(d)) == before)
        let mid = t.calls.count
        #expect(try be.merge(d, levels: 0...1, progress: nil) == [paths[3]])
        #expect(t.calls[mid...].map(\.op).filter { $0 != .balloon } == [.merge])
        #expect(try DeviceContent.readAll(try be.openIO(d)) == before)
        #expect(try be.info(d).levels.map(\.path) == [paths[0]])
        try be.umount(d)
        var o = Checker.Options()
        o.force = true
        o.readOnly = true
        #expect(try Checker.check(path: paths[0], options: o).status == .ok)
    }

    /// The merged base is smaller than a level above it: it grows, and the clusters it moves are
    /// told to the kernel (UPDATE_INDEX) before their old place becomes BAT space.
    @Test func lowerMergeIntoASmallerBaseTellsTheKernelOfMovedClusters() throws {
        let dir = try ScratchDirectory("ploop-kbytes")
        let cb = Int(Self.cs) * 512
        let base = dir.file("base")
        // 64 KiB clusters map 16368 clusters per BAT cluster: 16000 fit one, 40000 need three.
        try Offline.initialize(.init(path: base, sizeSectors: 16000 * UInt64(Self.cs), clusterSectors: Self.cs))
        let img = try Ploop1Image(file: try ImagePath.open(base, write: true), writable: true)
        for c in 0..<4 as Range<UInt64> {
            try DeviceContent.pattern(cb, seed: c + 10).withUnsafeBytes { try img.write(cluster: ClusterIndex(c), data: $0) }
        }
        try img.close()
        let mid = dir.file("mid")
        try Offline.initialize(.init(path: mid, sizeSectors: 40000 * UInt64(Self.cs), clusterSectors: Self.cs))
        let m = try Ploop1Image(file: try ImagePath.open(mid, write: true), writable: true)
        try DeviceContent.pattern(cb, seed: 99).withUnsafeBytes { try m.write(cluster: ClusterIndex(39999), data: $0) }
        try m.close()
        let top = dir.file("top")
        try Offline.initialize(.init(path: top, sizeSectors: 40000 * UInt64(Self.cs), clusterSectors: Self.cs))
        let fake = FakeKernel(lower: InProcessBackend(), sysfsRoot: dir.file("sys"))
        let t = RecordingTransport(sysfsRoot: fake.sysfsRoot, inner: fake)
        let be = KernelBackend(transport: t, umountTimeout: 1)
        let d = try be.mount(MountRequest(images: [base, mid, top]))
        let io = try be.openIO(d)
        func read(_ c: Int) throws -> [UInt8] {
            var b = [UInt8](repeating: 0, count: cb)
            try b.withUnsafeMutableBytes { try io.read(into: $0, at: UInt64(c * cb)) }
            return b
        }
        let want = try [0, 1, 2, 3, 39999].map(read)
        #expect(try be.merge(d, levels: 0...1, progress: nil) == [mid])
        let updates = t.calls.filter { $0.op == .updateIndex }
        #expect(!updates.isEmpty, "the base's data clusters stood where its BAT grows")
        #expect(updates.allSatisfy { $0.bytes.u32(0) == 1 && $0.bytes[4] == 0 })
        #expect(try [0, 1, 2, 3, 39999].map(read) == want)
        try be.umount(d)
    }

    @Test func copyRunsUnchangedThroughTheKernelBackend() throws {
        let dir = try ScratchDirectory("ploop-kbytes")
        let base = dir.file("base")
        try Offline.initialize(.init(path: base, sizeSectors: 256 * UInt64(Self.cs), clusterSectors: Self.cs))
        let be = KernelBackend(transport: FakeKernel(lower: InProcessBackend(), sysfsRoot: dir.file("sys")), umountTimeout: 1)
        let d = try be.mount(MountRequest(images: [base]))
        let io = try be.openIO(d)
        try DeviceContent.pattern(4 << 20, seed: 3).withUnsafeBytes { try io.write($0, at: 0) }
        // A writer that runs until the stop command asks it to stop, then lets the command return.
        let flag = dir.file("stop")
        let stopped = DispatchSemaphore(value: 0)
        let writer = Thread {
            var x: UInt64 = 7
            while !FileManager.default.fileExists(atPath: flag) {
                x = x &* 6364136223846793005 &+ 1442695040888963407
                let at = (x >> 20) % UInt64(256 * Int(Self.cs) * 512 - 4096)
                try? DeviceContent.pattern(4096, seed: x).withUnsafeBytes { try io.write($0, at: at & ~4095) }
            }
            stopped.signal()
            unlink(flag)
        }
        writer.start()
        Thread.sleep(forTimeInterval: 0.05)
        let copy = dir.file("copy")
        let sender = CopySender(backend: be, device: d, mountPoint: nil, stopCommand: "touch \(flag); while [ -e \(flag) ]; do sleep 0.01; done")
        let report = try sender.run(into: try FileSink(destination: copy))
        #expect(stopped.wait(timeout: .now()) == .success, "the writer stopped at the stop command")
        #expect(report.passes >= 2)
        let source = try DeviceContent.readAll(io)
        let other = InProcessBackend()
        let d2 = try other.mount(MountRequest(images: [copy], readOnly: true))
        #expect(try DeviceContent.readAll(try other.openIO(d2)) == source)
        try other.umount(d2)
        try be.umount(d)
    }
}

/// `SystemTransport` on this machine: the node rules, and what a host without the module says.
struct SystemTransportTests {
    @Test(.enabled(if: geteuid() == 0, "needs root (mknod)"))
    func nodesAreMadeWithTheManualsNumbersAndOthersAreRefused() throws {
        let dir = try ScratchDirectory("ploop-knode")
        let t = SystemTransport(sysfsRoot: dir.file("sys"), devRoot: dir.path)
        do { try t.ensureNode(3) } catch {
            // A scratch file system mounted nodev still allows mknod; a sandbox may not.
            if case .unavailable = error { return }
            throw error
        }
        var maj: UInt32 = 0
        var min: UInt32 = 0
        #expect(cploop_block_numbers(t.node(3), &maj, &min) == 0)
        #expect(maj == 182 && min == 48)
        // Another driver's node under the name is refused, not used.
        #expect(cploop_mknod_block(dir.file("ploop4"), 7, 0, 0o600) == 0)
        #expect(throws: DeviceError.self) { try t.ensureNode(4) }
        if KernelDeviceState.module().loaded { return }
        // No driver behind major 182: a clear error naming the module.
        do {
            _ = try t.ioctl(device: 3, request: KernelIoctl.getDevice.request, argument: nil)
            Issue.record("an ioctl on a node without a driver succeeded")
        } catch {
            guard case .unavailable(let why) = error else { Issue.record("\(error)"); return }
            #expect(why.contains("modprobe ploop"), "\(why)")
        }
    }

    @Test func unavailableWithoutTheModule() {
        let dir = try! ScratchDirectory("ploop-knode")
        #expect(KernelBackend.unavailableReason(sysfs: dir.path)?.contains("modprobe ploop") == true)
    }
}
