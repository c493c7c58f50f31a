import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopTestSupport
import Synchronization
import Testing

/// The online merge of the top while writes go on: writes to clusters the merge has copied are
/// mirrored into the destination, so the merge converges however hard the device is written and
/// holds I/O at the switch only for the few clusters the top allocated since the last pass.
struct MergeMirrorTests {
    static let n: UInt64 = 96

    /// `topHoldsAll`: the top holds every cluster, so no write allocates during the merge and
    /// nothing is left for the pause; otherwise it holds every other cluster and writes allocate.
    @Test(arguments: [true, false])
    func mergeUnderAWriterThatNeverStops(_ topHoldsAll: Bool) throws {
        let b = try Bench(.inProcess)
        let cb = Bench.cb
        let n = Self.n
        let base = try b.image("l0", clusters: n, fill: Array(0..<n), tag: 1)
        let held = topHoldsAll ? Array(0..<n) : Array(stride(from: 0, to: n, by: 2))
        let top = try b.image("l1", clusters: n, fill: held, tag: 2)
        var ref = Reference(size: Int(n) * cb)
        for c in 0..<n { ref.putCluster(c, tag: 1) }
        for c in held { ref.putCluster(c, tag: 2) }
        let model = try DeviceModel(MountRequest(images: [base, top]))
        let io = ModelIO(model: model)

        // Writes made from the progress callback, between the copies of one pass: each lands in a
        // cluster the merge copied already (mirrored), in one it has not reached yet, and, when
        // the top lacks clusters, in one it must allocate (copied again in a later pass). The
        // reference learns them in the order they are made.
        let made = Mutex<[(UInt64, [UInt8])]>([])
        let fired = Atomic<Bool>(false)
        @Sendable func put(_ data: [UInt8], at: UInt64) throws {
            try data.withUnsafeBytes { try io.write($0, at: at) }
            made.withLock { $0.append((at, data)) }
        }
        let progress: @Sendable (Int, Int) -> Void = { done, _ in
            guard done == held.count / 2, !fired.exchange(true, ordering: .relaxed) else { return }
            do {
                try put(Pattern.bytes(4096, seed: 501), at: UInt64(cb) * 4 + 8192)  // copied
                try put(Pattern.bytes(700, seed: 504), at: UInt64(cb) + 3)  // copied, or allocated by the top
                try put(Pattern.bytes(6000, seed: 502), at: UInt64(cb) * (n - 2) + 100)  // not copied yet
                try io.discard(at: UInt64(cb) * 2, length: UInt64(cb / 2))  // copied or a hole: either way zeros
                made.withLock { $0.append((UInt64(cb) * 2, [UInt8](repeating: 0, count: cb / 2))) }
                if !topHoldsAll { try put(Pattern.bytes(512, seed: 503), at: UInt64(cb) * 3 + 512) }  // a cluster the top lacks
            } catch {
                Issue.record("write during the merge: \(error)")
            }
        }

        // And a writer that keeps going before, during and after the merge, on the clusters the
        // callback leaves alone.
        let w = Writer(io, range: UInt64(8 * cb)..<UInt64(n - 8) * UInt64(cb), chunk: 4096, zeros: true, discards: true)
        w.start(seed: 42)
        while w.count < 300 && w.failure == nil { Thread.sleep(forTimeInterval: 0.001) }
        let removed = try model.merge(levels: 0...1, progress: progress)
        let at = w.count
        while w.count < at + 300 && w.failure == nil { Thread.sleep(forTimeInterval: 0.001) }
        w.stop()
        #expect(w.failure == nil)
        #expect(removed == [top])
        let didFire = fired.load(ordering: .relaxed)
        #expect(didFire)

        for (at, data) in made.withLock({ $0 }) { ref.put(data, at: Int(at)) }
        w.apply(to: &ref)
        let report = try #require(model.lastMergeReport)
        #expect(report.mirrored >= 2, "\(report)")
        if topHoldsAll {
            #expect(report.pausedClusters == 0, "\(report)")
            #expect(report.copied >= held.count, "\(report)")
        } else {
            // Each cluster is copied again at most once: only after the top allocated it.
            #expect(report.pausedClusters <= 16, "\(report)")
            let total = report.copied + report.pausedClusters
            #expect(total >= held.count + 2 && total <= Int(n) + held.count, "\(report)")
        }
        var got = [UInt8](repeating: 0, count: Int(n) * cb)
        try got.withUnsafeMutableBytes { try model.read(into: $0, at: 0) }
        expectSame(got, ref.bytes, "after the merge")
        try model.stop()

        // The base alone now holds the device: every write, and it passes check.
        try b.expectClean([base])
        let again = try DeviceModel(MountRequest(images: [base]))
        var reread = [UInt8](repeating: 0, count: Int(n) * cb)
        try reread.withUnsafeMutableBytes { try again.read(into: $0, at: 0) }
        try again.stop()
        expectSame(reread, ref.bytes, "the base after the merge")
    }
}
