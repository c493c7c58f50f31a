import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

/// Device behaviours written once, run against every backend in `Harness.all`. Every case checks
/// content against a reference byte array.
@Suite(.serialized)
struct ConformanceTests {
    @Test(arguments: Harness.all)
    func readsThroughThreeLevels(_ h: Harness) throws {
        let b = try Bench(h)
        var ref = Reference(size: 32 * Bench.cb)
        let base = try b.image("base", clusters: 32, fill: [0, 1, 2, 3, 20], tag: 1)
        let d1 = try b.image("d1", clusters: 32, fill: [1, 2, 9], tag: 2)
        let d2 = try b.image("d2", clusters: 32, fill: [2, 31], tag: 3)
        for c in [0, 1, 2, 3, 20] as [UInt64] { ref.putCluster(c, tag: 1) }
        for c in [1, 2, 9] as [UInt64] { ref.putCluster(c, tag: 2) }
        for c in [2, 31] as [UInt64] { ref.putCluster(c, tag: 3) }
        let d = try b.mount([base, d1, d2])
        expectSame(try b.readAll(), ref.bytes)
        // Unaligned reads across cluster boundaries.
        let io = try b.io
        var buf = [UInt8](repeating: 0, count: Bench.cb + 1000)
        try buf.withUnsafeMutableBytes { try io.read(into: $0, at: UInt64(Bench.cb) - 500) }
        #expect(buf == Array(ref.bytes[Bench.cb - 500..<2 * Bench.cb + 500]))
        let info = try b.backend.info(d)
        #expect(info.levels.map(\.readOnly) == [true, true, false])
        #expect(info.sizeBytes == UInt64(32 * Bench.cb))
        try b.umount()
        try b.expectClean([base, d1, d2])
    }

    @Test(arguments: Harness.all)
    func rawBaseWithDeltas(_ h: Harness) throws {
        let b = try Bench(h)
        var ref = Reference(size: 16 * Bench.cb)
        let base = try b.raw("base.raw", clusters: 16, fill: [0, 5, 15], tag: 1)
        let top = try b.image("top", clusters: 16, fill: [5], tag: 2)
        for c in [0, 5, 15] as [UInt64] { ref.putCluster(c, tag: 1) }
        ref.putCluster(5, tag: 2)
        _ = try b.mount([base, top], raw: true)
        expectSame(try b.readAll(), ref.bytes)
        let data = Pattern.bytes(3000, seed: 7)
        try b.write(data, at: 15 * UInt64(Bench.cb) + 100)
        ref.put(data, at: 15 * Bench.cb + 100)
        expectSame(try b.readAll(), ref.bytes)
        try b.umount()
        // The raw base is untouched: writes went to the top.
        #expect(Array(b.dir.read("base.raw")[15 * Bench.cb..<16 * Bench.cb]) == Pattern.cluster(15, tag: 1, size: Bench.cb))
    }

    @Test(arguments: Harness.all)
    func partialWritesCopyUp(_ h: Harness) throws {
        let b = try Bench(h)
        var ref = Reference(size: 8 * Bench.cb)
        let base = try b.image("base", clusters: 8, fill: [3], tag: 1)
        let top = try b.image("top", clusters: 8)
        let baseBefore = b.dir.read("base")
        ref.putCluster(3, tag: 1)
        _ = try b.mount([base, top])
        let data = Pattern.bytes(4096, seed: 11)
        try b.write(data, at: 3 * UInt64(Bench.cb) + 8192)
        ref.put(data, at: 3 * Bench.cb + 8192)
        // A partial write where nothing below has data: zeros around it.
        try b.write(data, at: 6 * UInt64(Bench.cb) + 512)
        ref.put(data, at: 6 * Bench.cb + 512)
        expectSame(try b.readAll(), ref.bytes)
        try b.umount()
        #expect(b.dir.read("base") == baseBefore)
        let t = try Ploop1Image(file: try ImagePath.open(top, write: false), writable: false)
        #expect(t.block(of: ClusterIndex(3)) != nil)
        #expect(t.block(of: ClusterIndex(6)) != nil)
        try b.expectClean([base, top])
        // Remount: the same content.
        _ = try b.mount([base, top])
        expectSame(try b.readAll(), ref.bytes)
    }

    @Test(arguments: Harness.all)
    func inUseMarkWhileRunning(_ h: Harness) throws {
        let b = try Bench(h)
        let base = try b.image("base", clusters: 8)
        _ = try b.mount([base])
        #expect(try ImageInfo.read(path: base).inUse)
        try b.umount()
        #expect(try !ImageInfo.read(path: base).inUse)
    }

    /// Discard reads back as zeros, masks what lower deltas hold, and gives the top's space back
    /// to the host (holes in the image file); every other byte is kept, across a remount.
    @Test(arguments: Harness.all)
    func discardReadsZerosAndFreesSpace(_ h: Harness) throws {
        let b = try Bench(h)
        var ref = Reference(size: 8 * Bench.cb)
        let base = try b.image("base", clusters: 8, fill: Array(0..<8), tag: 1)
        let top = try b.image("top", clusters: 8, fill: [2, 3, 5], tag: 2)
        for c in 0..<UInt64(8) { ref.putCluster(c, tag: 1) }
        for c in [2, 3, 5] as [UInt64] { ref.putCluster(c, tag: 2) }
        _ = try b.mount([base, top])
        /// Bytes the top's file holds on disk inside the block of cluster `c`.
        func stored(_ c: UInt64) throws -> UInt64 {
            let img = try Ploop1Image(file: try ImagePath.open(top, write: false), writable: false)
            let at = img.blockOffset(img.block(of: ClusterIndex(c))!)
            let f = try File(path: top, mode: .readOnly)
            return try f.allocatedRanges(from: at, to: at + UInt64(Bench.cb)).reduce(0) { $0 + $1.upperBound - $1.lowerBound }
        }
        #expect(try [2, 3, 5].map(stored) == [UInt64](repeating: UInt64(Bench.cb), count: 3))
        let io = try b.io
        let cb = UInt64(Bench.cb)
        // Two whole clusters of the top, a ragged piece of another, one only the base holds.
        for (at, length) in [(2 * cb, 2 * cb), (5 * cb + 1024, 40960), (6 * cb, cb)] {
            try io.discard(at: at, length: length)
            ref.put([UInt8](repeating: 0, count: Int(length)), at: Int(at))
        }
        try b.backend.sync(b.device!)
        expectSame(try b.readAll(), ref.bytes)
        // The whole clusters gave all their space back, the ragged piece its whole pages.
        let left = try [2, 3, 5].map(stored)
        #expect(left[0] == 0 && left[1] == 0, "clusters 2, 3 still hold \(left[0]), \(left[1]) bytes")
        #expect(left[2] <= cb - 36864, "cluster 5 still holds \(left[2]) bytes")
        try b.umount()
        try b.expectClean([base, top])
        // The base is untouched: the zeros over cluster 6 live in the top.
        let baseImage = try Ploop1Image(file: try ImagePath.open(base, write: false), writable: false)
        var six = [UInt8](repeating: 0, count: Bench.cb)
        #expect(try six.withUnsafeMutableBytes { try baseImage.read(cluster: ClusterIndex(6), into: $0) })
        #expect(six == Pattern.cluster(6, tag: 1, size: Bench.cb))
        _ = try b.mount([base, top])
        expectSame(try b.readAll(), ref.bytes)
    }

    /// SYNC makes the top's header on disk true while it runs: in use, and not empty once data exist.
    @Test(arguments: Harness.all)
    func syncMakesTheRunningHeaderTrue(_ h: Harness) throws {
        let b = try Bench(h)
        let base = try b.image("base", clusters: 8)
        let d = try b.mount([base])
        #expect(try ImageInfo.read(path: base).flags.contains("empty"))
        try b.write(Pattern.bytes(4096, seed: 5), at: 4096)
        try b.backend.sync(d)
        let info = try ImageInfo.read(path: base)
        #expect(info.inUse)
        #expect(!info.flags.contains("empty"), "\(info.flags)")
        try b.umount()
    }

    @Test(arguments: Harness.all)
    func snapshotUnderConcurrentWriters(_ h: Harness) throws {
        let b = try Bench(h)
        var ref = Reference(size: 64 * Bench.cb)
        let base = try b.image("base", clusters: 64, fill: Array(0..<64), tag: 1)
        for c in 0..<UInt64(64) { ref.putCluster(c, tag: 1) }
        let d = try b.mount([base])
        let io = try b.io
        let writers = (0..<2).map { i in Writer(io, range: UInt64(i * 32 * Bench.cb)..<UInt64((i * 32 + 32) * Bench.cb)) }
        for (i, w) in writers.enumerated() { w.start(seed: UInt64(i + 1)) }
        Thread.sleep(forTimeInterval: 0.05)
        try b.backend.snapshot(d, newDelta: b.path("snap1"))
        Thread.sleep(forTimeInterval: 0.05)
        try b.backend.snapshot(d, newDelta: b.path("snap2"))
        Thread.sleep(forTimeInterval: 0.05)
        for w in writers { w.stop() }
        for w in writers { #expect(w.failure == nil); #expect(w.count > 0); w.apply(to: &ref) }
        #expect(try b.backend.info(d).levels.count == 3)
        expectSame(try b.readAll(), ref.bytes)
        try b.umount()
        try b.expectClean([base, b.path("snap1"), b.path("snap2")])
        _ = try b.mount([base, b.path("snap1"), b.path("snap2")])
        expectSame(try b.readAll(), ref.bytes)
    }

    /// Writes acknowledged before a snapshot are in the old top; the ones started after it, in the new.
    @Test(arguments: Harness.all)
    func snapshotSplitsWritesAtItsMoment(_ h: Harness) throws {
        let b = try Bench(h)
        let base = try b.image("base", clusters: 8)
        let d = try b.mount([base])
        let before = Pattern.bytes(4096, seed: 1)
        let after = Pattern.bytes(4096, seed: 2)
        try b.write(before, at: 0)
        try b.backend.snapshot(d, newDelta: b.path("s"))
        try b.write(after, at: 0)
        try b.umount()
        _ = try b.mount([base], readOnly: true)
        #expect(Array(try b.readAll()[0..<4096]) == before)
        try b.umount()
        _ = try b.mount([base, b.path("s")])
        #expect(Array(try b.readAll()[0..<4096]) == after)
    }

    struct MergeCase: Sendable, CustomTestStringConvertible {
        var harness: Harness
        var range: ClosedRange<Int>
        var testDescription: String { "\(harness.name) \(range.lowerBound)..\(range.upperBound)" }
    }

    static var mergeCases: [MergeCase] {
        // Three levels: 0...1 leaves the top alone; the others merge it.
        Harness.all.flatMap { h in
            [0...2, 0...1, 1...2].filter { !h.lacks.contains(.mergeTop) || $0.upperBound < 2 }.map { MergeCase(harness: h, range: $0) }
        }
    }

    @Test(arguments: mergeCases)
    func onlineMergeUnderWriters(_ m: MergeCase) throws {
        let b = try Bench(m.harness)
        var ref = Reference(size: 48 * Bench.cb)
        let paths = [
            try b.image("l0", clusters: 48, fill: Array(0..<24), tag: 1),
            try b.image("l1", clusters: 48, fill: Array(stride(from: 0, to: 48, by: 3)), tag: 2),
            try b.image("l2", clusters: 48, fill: Array(stride(from: 1, to: 48, by: 4)), tag: 3),
        ]
        for c in 0..<UInt64(24) { ref.putCluster(c, tag: 1) }
        for c in stride(from: 0, to: 48, by: 3) { ref.putCluster(UInt64(c), tag: 2) }
        for c in stride(from: 1, to: 48, by: 4) { ref.putCluster(UInt64(c), tag: 3) }
        let d = try b.mount(paths)
        let io = try b.io
        let w = Writer(io, range: 0..<UInt64(48 * Bench.cb), chunk: 4096, zeros: true)
        w.start(seed: 99)
        Thread.sleep(forTimeInterval: 0.02)
        let removed = try b.backend.merge(d, levels: m.range, progress: nil)
        Thread.sleep(forTimeInterval: 0.02)
        w.stop()
        #expect(w.failure == nil)
        w.apply(to: &ref)
        #expect(removed == Array(paths[(m.range.lowerBound + 1)...m.range.upperBound]))
        let info = try b.backend.info(d)
        #expect(info.levels.count == 3 - (m.range.upperBound - m.range.lowerBound))
        #expect(info.levels.last?.readOnly == false)
        #expect(info.state == .off)
        expectSame(try b.readAll(), ref.bytes)
        let remaining = info.levels.map(\.path)
        try b.umount()
        try b.expectClean(remaining)
        _ = try b.mount(remaining)
        expectSame(try b.readAll(), ref.bytes)
    }

    @Test(arguments: Harness.all)
    func growUnderIO(_ h: Harness) throws {
        let b = try Bench(h)
        // 64 KiB clusters: one BAT cluster maps 16368 entries; growing to 40000 moves data.
        let base = try b.image("base", clusters: 16000, fill: [0, 1, 2, 3, 15999], tag: 1)
        var ref = Reference(size: 64 * Bench.cb)
        for c in [0, 1, 2, 3] as [UInt64] { ref.putCluster(c, tag: 1) }
        let d = try b.mount([base])
        let w = Writer(try b.io, range: 0..<UInt64(64 * Bench.cb))
        w.start(seed: 5)
        Thread.sleep(forTimeInterval: 0.02)
        try b.backend.grow(d, sizeSectors: 40000 * UInt64(Bench.cs))
        Thread.sleep(forTimeInterval: 0.02)
        w.stop()
        #expect(w.failure == nil)
        w.apply(to: &ref)
        #expect(try b.backend.info(d).sizeBytes == UInt64(40000 * Bench.cb))
        let tail = Pattern.bytes(8192, seed: 3)
        try b.write(tail, at: UInt64(39999 * Bench.cb))
        // The device is 2.5 GB: compare the regions that hold data, and samples of the rest.
        expectSame(try b.read(0, 64 * Bench.cb), ref.bytes)
        #expect(try b.read(15999 * Bench.cb, Bench.cb) == Pattern.cluster(15999, tag: 1, size: Bench.cb))
        #expect(try b.read(39999 * Bench.cb, 8192) == tail)
        #expect(try b.read(39999 * Bench.cb + 8192, Bench.cb - 8192) == [UInt8](repeating: 0, count: Bench.cb - 8192))
        for c in [64, 16000, 16500, 30000, 39998] {
            #expect(try b.read(c * Bench.cb, Bench.cb) == [UInt8](repeating: 0, count: Bench.cb))
        }
        #expect(throws: DeviceError.cannotShrink(fromSectors: 40000 * UInt64(Bench.cs), toSectors: 100)) { try b.backend.grow(d, sizeSectors: 100) }
        try b.umount()
        try b.expectClean([base])
        _ = try b.mount([base])
        expectSame(try b.read(0, 64 * Bench.cb), ref.bytes)
        #expect(try b.read(39999 * Bench.cb, 8192) == tail)
    }

    @Test(arguments: Harness.with(.balloon))
    func stateMachineRefusals(_ h: Harness) throws {
        let b = try Bench(h)
        let base = try b.image("base", clusters: 16, fill: [1, 2])
        let d = try b.mount([base])
        let be = b.backend
        // Free blocks only in BALLOON; relocation only after them.
        #expect(throws: DeviceError.wrongState(.loadFreeBlocks, .off)) { try be.loadFreeBlocks(d, level: 0, extents: []) }
        #expect(throws: DeviceError.wrongState(.relocateBlocks, .off)) { try be.relocateBlocks(d, level: 0, allocHead: 3, extents: []) }
        // Tracking excludes the other maintenances.
        _ = try be.trackInit(d)
        #expect(throws: DeviceError.busy(.track)) { try be.merge(d, levels: 0...1, progress: nil) }
        #expect(throws: DeviceError.busy(.track)) { try be.snapshot(d, newDelta: b.path("x")) }
        #expect(throws: DeviceError.busy(.track)) { try be.grow(d, sizeSectors: 64 * 128) }
        #expect(throws: DeviceError.busy(.track)) { try be.umount(d) }
        #expect(try be.balloon(d, inflate: true, keepIntact: false).state == .track)
        try be.trackAbort(d)
        // A stale BALLOON blocks the others until cleared.
        #expect(try be.balloon(d, inflate: true, keepIntact: false).state == .balloon)
        #expect(throws: DeviceError.busy(.balloon)) { try be.snapshot(d, newDelta: b.path("x")) }
        #expect(throws: DeviceError.busy(.balloon)) { _ = try be.trackInit(d) }
        #expect(throws: DeviceError.conflictingFlags("inflate and keep-intact together")) {
            try be.balloon(d, inflate: true, keepIntact: true)
        }
        #expect(try be.state(d) == .balloon)
        #expect(try be.balloon(d, inflate: false, keepIntact: false).state == .off)
        // Nothing was created by the refused snapshots.
        #expect(!FileManager.default.fileExists(atPath: b.path("x")))
        // Out-of-range levels.
        #expect(throws: DeviceError.levelsOutOfRange(0...1, top: 0)) { try be.merge(d, levels: 0...1, progress: nil) }
        #expect(throws: DeviceError.levelsOutOfRange(1...1, top: 0)) { try be.merge(d, levels: 1...1, progress: nil) }
        // A snapshot onto an existing file is refused and leaves it alone.
        b.dir.write("exists", [1, 2, 3])
        #expect(throws: DeviceError.image(.alreadyExists(b.path("exists")))) { try be.snapshot(d, newDelta: b.path("exists")) }
        #expect(b.dir.read("exists") == [1, 2, 3])
        // I/O past the end.
        let io = try b.io
        var buf = [UInt8](repeating: 0, count: 4096)
        #expect(throws: DeviceError.outOfRange(offset: UInt64(16 * Bench.cb) - 100, length: 4096, size: UInt64(16 * Bench.cb))) {
            try buf.withUnsafeMutableBytes { try io.read(into: $0, at: UInt64(16 * Bench.cb) - 100) }
        }
        // A second mount of an image in use.
        // (held by the in-use mark in process, by its lock where another process has it)
        expectError([.image(.inUse(base)), .image(.locked(base))]) { _ = try be.mount(MountRequest(images: [base])) }
        try b.umount()
    }

    @Test(arguments: Harness.all)
    func readOnlyMountRefusesWrites(_ h: Harness) throws {
        let b = try Bench(h)
        let base = try b.image("base", clusters: 8)
        let before = b.dir.read("base")
        _ = try b.mount([base], readOnly: true)
        #expect(throws: DeviceError.self) { try b.write([1, 2, 3], at: 0) }
        try b.umount()
        #expect(b.dir.read("base") == before)
    }

    /// Every cluster written after TRACK_INIT is reported, zeros over data included: a copy made from
    /// the file plus the reported extents equals the file.
    @Test(arguments: Harness.with(.tracking))
    func trackingIsComplete(_ h: Harness) throws {
        let b = try Bench(h)
        let base = try b.image("base", clusters: 256, fill: Array(0..<128), tag: 1)
        let d = try b.mount([base])
        let be = b.backend
        let w = Writer(try b.io, range: 0..<UInt64(256 * Bench.cb), chunk: 4096, zeros: true)
        w.start(seed: 42)
        let end = try be.trackInit(d)
        #expect(end >= UInt64(129 * Bench.cb))
        let src = try ImagePath.open(base, write: false)
        var copy = [UInt8]()
        func take(_ r: Range<UInt64>) throws {
            if UInt64(copy.count) < r.upperBound { copy += [UInt8](repeating: 0, count: Int(r.upperBound) - copy.count) }
            let bytes = try src.readBytes(Int(r.upperBound - r.lowerBound), at: r.lowerBound)
            copy.replaceSubrange(Int(r.lowerBound)..<Int(r.lowerBound) + bytes.count, with: bytes)
        }
        // Full pass, then dirty extents until the writer stops and nothing is left.
        var pos: UInt64 = 0
        while pos < end {
            try be.trackSetPosition(d, pos + UInt64(Bench.cb))
            try take(pos..<pos + UInt64(Bench.cb))
            pos += UInt64(Bench.cb)
        }
        for _ in 0..<20 {
            while let r = try be.trackRead(d) {
                if r.upperBound > pos { try be.trackSetPosition(d, r.upperBound); pos = r.upperBound }
                try take(r)
            }
        }
        w.stop()
        // One write after the last drain, so extents are unread whatever the writer managed on a
        // loaded machine (it may have written nothing since).
        try b.write([0xEE], at: 5)
        try be.sync(d)
        #expect(throws: DeviceError.unreadExtents) { try be.trackStop(d) }
        while let r = try be.trackRead(d) {
            if r.upperBound > pos { try be.trackSetPosition(d, r.upperBound); pos = r.upperBound }
            try take(r)
        }
        try be.trackStop(d)
        let file = try src.readBytes(Int(try src.size()), at: 0)
        #expect(copy.count == file.count)
        #expect(copy == file)
        try b.umount()
    }

    /// Blocks under a balloon are reused for new clusters, and the tail is relocated into them; the
    /// image shrinks and every cluster outside the balloon keeps its bytes.
    @Test(arguments: Harness.with(.balloon))
    func freeBlocksAndRelocationKeepEveryByte(_ h: Harness) throws {
        let b = try Bench(h)
        var ref = Reference(size: 128 * Bench.cb)
        let base = try b.image("base", clusters: 128, fill: Array(0..<64), tag: 1)
        for c in 0..<UInt64(64) { ref.putCluster(c, tag: 1) }
        let d = try b.mount([base])
        let be = b.backend
        let balloon: [UInt64] = Array(10..<20) + Array(30..<35)
        // What user space reads from the top image's BAT.
        let bat = try Ploop1Image(file: try ImagePath.open(base, write: false), writable: false)
        var extents: [FreeExtent] = []
        for c in balloon {
            let blk = bat.block(of: ClusterIndex(c))!.value
            if var last = extents.last, last.cluster + last.length == UInt32(c), last.block + last.length == blk {
                last.length += 1
                extents[extents.count - 1] = last
            } else {
                extents.append(FreeExtent(cluster: UInt32(c), block: blk, length: 1))
            }
        }
        #expect(try be.balloon(d, inflate: true, keepIntact: false).state == .balloon)
        let head = try be.loadFreeBlocks(d, level: 0, extents: extents)
        #expect(head == 65)
        #expect(try be.state(d) == .fbloaded)
        #expect(try be.freeBlockList(d).reduce(0) { $0 + $1.length } == 15)
        // New clusters take free blocks: the file does not grow.
        let sizeBefore = try ImageInfo.read(path: base).fileSize
        for c in [100, 101, 102] as [UInt64] {
            let data = Pattern.cluster(c, tag: 9, size: Bench.cb)
            try b.write(data, at: c * UInt64(Bench.cb))
            ref.put(data, at: Int(c) * Bench.cb)
        }
        try be.sync(d)
        #expect(try ImageInfo.read(path: base).fileSize == sizeBefore)
        // Relocate the tail (blocks 53..64) into the 12 free blocks left, as user space computes it.
        let owners = try Ploop1Image(file: try ImagePath.open(base, write: false), writable: false).owners()
        let tail = (UInt32(65 - 12)..<65).compactMap { blk in owners[blk].map { RelocExtent(cluster: UInt32($0.value), block: blk, length: 1, free: false) } }
        let cut = try be.relocateBlocks(d, level: 0, allocHead: head, extents: tail)
        #expect(cut == 12)
        #expect(try be.state(d) == .off)
        #expect(try ImageInfo.read(path: base).fileSize == sizeBefore - 12 * UInt64(Bench.cb))
        // Balloon clusters are don't-care; everything else must match.
        var got = try b.readAll()
        for c in balloon {
            let r = Int(c) * Bench.cb..<Int(c + 1) * Bench.cb
            got.replaceSubrange(r, with: ref.bytes[r])
        }
        expectSame(got, ref.bytes)
        try b.umount()
        try b.expectClean([base])
    }
}

/// Expects `body` to throw one of `allowed` (backends that reach the same refusal by different
/// routes), naming what it threw otherwise.
func expectError(_ allowed: [DeviceError], sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("expected one of \(allowed), nothing was thrown", sourceLocation: sourceLocation)
    } catch let e as DeviceError {
        #expect(allowed.contains(e), "threw \(e), expected one of \(allowed)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("threw \(error), expected one of \(allowed)", sourceLocation: sourceLocation)
    }
}
