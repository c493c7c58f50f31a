import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopTestSupport
import Synchronization
import Testing

/// The model's side of asynchronous I/O (`startDirect`/`finishDirect`, which the FUSE server
/// drives with Linux AIO): which requests it hands out, that the I/O it hands out lands where the
/// synchronous path would put it, and that a stack change waits for I/O still in flight.
@Suite(.enabled(if: DirectIOProbe.unavailable == nil, "\(DirectIOProbe.unavailable ?? "")"))
struct AsyncDirectTests {
    static let cb = Bench.cb

    /// A one-level device over an image opened as the daemon opens it (direct twin), with
    /// clusters 0 and 2 written; 8 clusters.
    static func device(_ b: Bench, direct: Bool = true, readOnly: Bool = false) throws -> DeviceModel {
        let base = try b.image("base", clusters: 8, fill: [0, 2], tag: 1)
        return try DeviceModel(MountRequest(images: [base], readOnly: readOnly), opener: PosixOpener(locking: false, direct: direct))
    }

    /// What `startDirect` handed out (nil: it declined).
    struct Handed {
        var fd: Int32
        var position: UInt64
        var token: UnsafeMutableRawPointer?
    }

    static func start(_ m: DeviceModel, write: Bool, at offset: UInt64, length: Int, accept: Bool = true) throws -> Handed? {
        var handed: Handed?
        let taken = try m.startDirect(write: write, at: offset, length: length) { fd, at, token in
            handed = Handed(fd: fd, position: at, token: token)
            return accept
        }
        #expect(taken == (handed != nil && accept))
        return taken ? handed : nil
    }

    /// An aligned buffer holding `bytes`.
    static func aligned(_ bytes: [UInt8]) -> UnsafeMutableRawBufferPointer {
        let p = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 4096)
        p.copyBytes(from: bytes)
        return p
    }

    @Test func onlyRequestsTheFilesCanServeDirectlyAreHandedOut() throws {
        let b = try Bench(.inProcess)
        let m = try Self.device(b)
        let cb = UInt64(Self.cb)
        // A cluster the top holds: reads and writes, at the block's place in the file.
        let w = try #require(try Self.start(m, write: true, at: 2 * cb + 8192, length: 4096))
        #expect(w.token != nil, "a write carries the image to note it in")
        m.finishDirect(token: w.token, position: w.position, length: 4096)
        let r = try #require(try Self.start(m, write: false, at: 2 * cb + 8192, length: 4096))
        #expect(r.position == w.position && r.token == nil)
        m.finishDirect(token: nil, position: r.position, length: 4096)
        // Not handed out: a hole (read zeros, or allocate), a range across two clusters, an
        // unaligned offset or length, an empty range.
        #expect(try Self.start(m, write: false, at: 1 * cb, length: 4096) == nil)
        #expect(try Self.start(m, write: true, at: 1 * cb, length: 4096) == nil)
        #expect(try Self.start(m, write: true, at: 3 * cb - 4096, length: 8192) == nil)
        #expect(try Self.start(m, write: true, at: 2 * cb + 100, length: 4096) == nil)
        #expect(try Self.start(m, write: false, at: 2 * cb, length: 1000) == nil)
        #expect(try Self.start(m, write: false, at: 2 * cb, length: 0) == nil)
        // Past the end: the same error the synchronous path gives.
        #expect(throws: DeviceError.self) { try Self.start(m, write: false, at: 8 * cb, length: 4096) }
        // Declined by the submitter: nothing stays pinned (a snapshot does not wait forever).
        #expect(try Self.start(m, write: true, at: 2 * cb, length: 4096, accept: false) == nil)
        try m.snapshot(newDelta: b.path("top"))
        // The new top lacks cluster 2: a write there allocates (synchronous); a read finds the
        // block below.
        #expect(try Self.start(m, write: true, at: 2 * cb, length: 4096) == nil)
        let below = try #require(try Self.start(m, write: false, at: 2 * cb, length: 4096))
        #expect(below.position == w.position - 8192)
        m.finishDirect(token: nil, position: below.position, length: 4096)
        try m.stop()
    }

    @Test func buffered_readOnlyAndMergingDevicesTakeTheSynchronousPath() throws {
        let cb = UInt64(Self.cb)
        do {
            let b = try Bench(.inProcess)
            let m = try Self.device(b, direct: false)
            #expect(try Self.start(m, write: true, at: 2 * cb, length: 4096) == nil, "an image without a direct twin")
            try m.stop()
        }
        do {
            let b = try Bench(.inProcess)
            let m = try Self.device(b, readOnly: true)
            #expect(throws: DeviceError.self) { try Self.start(m, write: true, at: 2 * cb, length: 4096) }
            #expect(try Self.start(m, write: false, at: 2 * cb, length: 4096).map { m.finishDirect(token: nil, position: $0.position, length: 4096) } != nil)
            try m.stop()
        }
        do {
            // While the top is merged, every write goes through the merge's mirror.
            let b = try Bench(.inProcess)
            let m = try Self.device(b)
            try m.snapshot(newDelta: b.path("top"))
            let one = Self.aligned(Pattern.bytes(Self.cb, seed: 9))
            defer { one.deallocate() }
            for c in 0..<8 as Range<UInt64> { try m.write(UnsafeRawBufferPointer(one), at: c * cb) }
            let during = Mutex<[(Int, Bool)]>([])
            _ = try m.merge(levels: 0...1) { done, total in
                // Mid-pass (done < total) the merge is surely running; a write handed out anyway
                // is finished at once, so a failure here cannot hang the merge.
                var handed: (UInt64, UnsafeMutableRawPointer?)?
                let taken = (try? m.startDirect(write: true, at: 5 * cb, length: 4096) { _, at, token in
                    handed = (at, token)
                    return true
                }) ?? false
                if taken, let (at, token) = handed { m.finishDirect(token: token, position: at, length: 4096) }
                if done < total { during.withLock { $0.append((done, taken)) } }
            }
            let seen = during.withLock { $0 }
            #expect(!seen.isEmpty && !seen.contains { $0.1 }, "writes handed out during the merge: \(seen)")
            // After the merge, the same write is handed out again.
            let after = try #require(try Self.start(m, write: true, at: 5 * cb, length: 4096))
            m.finishDirect(token: after.token, position: after.position, length: 4096)
            try m.stop()
        }
    }

    final class Outcome: Sendable {
        let ended = Atomic<Bool>(false)
        let failure = Mutex<String?>(nil)
    }

    /// A write handed out before a snapshot: the snapshot waits until it has completed, the data
    /// lands in the old top where the synchronous path would have put it; and dirty tracking hears
    /// of such a write once it has completed.
    @Test func aStackChangeWaitsForIOInFlight() throws {
        let b = try Bench(.inProcess)
        let m = try Self.device(b)
        let cb = UInt64(Self.cb)
        let data = Pattern.bytes(8192, seed: 31)
        let buf = Self.aligned(data)
        defer { buf.deallocate() }
        // Dirty tracking hears of a write completed this way (its place in the file comes out
        // dirty), as of one the model made itself.
        // As a copier that has taken the whole file: from now on only writes come out dirty.
        try m.trackSetPosition(try m.trackInit())
        let tracked = try #require(try Self.start(m, write: true, at: 16384, length: 8192))
        #expect(pwrite(tracked.fd, buf.baseAddress, 8192, off_t(tracked.position)) == 8192)
        var dirty: [Range<UInt64>] = []
        for _ in 0..<16 { if let r = try m.trackRead() { dirty.append(r) } }
        #expect(!dirty.contains { $0.contains(tracked.position) }, "dirty before the write completed: \(dirty)")
        m.finishDirect(token: tracked.token, position: tracked.position, length: 8192)
        dirty = []
        for _ in 0..<16 { if let r = try m.trackRead() { dirty.append(r) } }
        #expect(dirty.contains { $0.contains(tracked.position) }, "tracked \(dirty), the write was at \(tracked.position)")
        try m.trackAbort()

        let w = try #require(try Self.start(m, write: true, at: 2 * cb + 4096, length: 8192))
        let outcome = Outcome()
        let top = b.path("top")
        let t = Thread {
            do { try m.snapshot(newDelta: top) } catch { outcome.failure.withLock { $0 = "\(error)" } }
            outcome.ended.store(true, ordering: .releasing)
        }
        t.start()
        usleep(300_000)
        let early = outcome.ended.load(ordering: .acquiring)
        #expect(!early, "the snapshot did not wait for the write in flight")
        // The "disk" completes the write now.
        #expect(pwrite(w.fd, buf.baseAddress, 8192, off_t(w.position)) == 8192)
        m.finishDirect(token: w.token, position: w.position, length: 8192)
        for _ in 0..<200 where !outcome.ended.load(ordering: .acquiring) { usleep(10_000) }
        let ended = outcome.ended.load(ordering: .acquiring), failed = outcome.failure.withLock { $0 }
        #expect(ended && failed == nil, "\(failed ?? "the snapshot never ended")")
        // The device reads it (from the level below the new top), and so does the base image on
        // its own once the device is stopped.
        var back = [UInt8](repeating: 0, count: 8192)
        try back.withUnsafeMutableBytes { try m.read(into: $0, at: 2 * cb + 4096) }
        #expect(back == data)
        try m.stop()
        let base = try Ploop1Image(file: try ImagePath.open(b.path("base"), write: false), writable: false)
        var whole = [UInt8](repeating: 0, count: Self.cb)
        #expect(try whole.withUnsafeMutableBytes { try base.read(cluster: ClusterIndex(2), into: $0) })
        var want = Pattern.cluster(2, tag: 1, size: Self.cb)
        want.replaceSubrange(4096..<4096 + 8192, with: data)
        #expect(whole == want)
    }
}
