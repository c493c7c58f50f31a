import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopTestSupport
import Testing

/// Long seeded random sequences of write/read/flush/snapshot/merge/grow against a reference byte
/// array. After stop: every image checks clean, a single-image result passes `qemu-img check`, and
/// an offline merge of the stack equals the reference. A failing seed reproduces exactly.
struct PropertyTests {
    typealias Rng = XorShift

    @Test(arguments: Array(UInt64(1)...32))
    func randomSequence(_ seed: UInt64) throws {
        let b = try Bench(.inProcess)
        var rng = Rng(seed: seed &* 0x9E37_79B9_7F4A_7C15)
        let rawBase = seed % 3 == 0
        var clusters = 24 + rng.below(24)
        var ref = Reference(size: clusters * Bench.cb)
        let base = rawBase ? try b.raw("base", clusters: UInt64(clusters)) : try b.image("base", clusters: UInt64(clusters), version: seed % 2 == 0 ? .v1 : .v2)
        let d = try b.mount([base], raw: rawBase)
        let be = b.backend
        var snapshots = 0
        var log: [String] = []
        for step in 0..<80 {
            let op = rng.below(100)
            let size = clusters * Bench.cb
            switch op {
            case 0..<50:
                let len = 1 + rng.below(3 * Bench.cb)
                let at = rng.below(size - min(len, size))
                let n = min(len, size - at)
                let data = rng.below(5) == 0 ? [UInt8](repeating: 0, count: n) : Pattern.bytes(n, seed: rng.next())
                try b.write(data, at: UInt64(at))
                ref.put(data, at: at)
                log.append("write \(at)+\(n)")
            case 50..<70:
                let len = 1 + rng.below(2 * Bench.cb)
                let at = rng.below(size - min(len, size))
                let n = min(len, size - at)
                expectSame(try b.read(at, n), Array(ref.bytes[at..<at + n]), "seed \(seed) step \(step) read \(at)+\(n): \(log)")
            case 70..<76:
                try be.sync(d)
            case 76..<84 where snapshots < 4:
                snapshots += 1
                try be.snapshot(d, newDelta: b.path("snap\(snapshots)"))
                log.append("snapshot size \(try be.info(d).sizeBytes / UInt64(Bench.cb))")
            case 84..<92:
                let levels = try be.info(d).levels.count
                guard levels >= 2 else { continue }
                let l1 = rng.below(levels - 1)
                let l2 = l1 + 1 + rng.below(levels - 1 - l1)
                _ = try be.merge(d, levels: l1...l2, progress: nil)
                log.append("merge \(l1)..\(l2)")
            case 92..<97:
                let more = 1 + rng.below(16)
                let top = try be.info(d).levels.last!
                if top.format == .raw { continue }
                log.append("grow \(clusters)+\(more) size \(try be.info(d).sizeBytes / UInt64(Bench.cb))")
                try be.grow(d, sizeSectors: UInt64(clusters + more) * UInt64(Bench.cs))
                clusters += more
                ref.grow(to: clusters * Bench.cb)

            default:
                break
            }
        }
        expectSame(try b.readAll(), ref.bytes, "seed \(seed): \(log)")
        let stack = try be.info(d).levels
        try b.umount()
        try b.expectClean(stack.map(\.path))
        if stack.count == 1, stack[0].format == .ploop1, let qemu = TestSupport.which("qemu-img") {
            let r = try TestSupport.run(qemu, ["check", "-f", "parallels", stack[0].path])
            #expect(r.code == 0, "\(r)")
        }
        // Offline merge of the whole stack into a raw file equals the reference.
        let out = b.path("out.raw")
        if stack[0].format == .raw {
            try FileManager.default.copyItem(atPath: stack[0].path, toPath: out)
        } else {
            b.dir.write("out.raw", [])
        }
        let deltas = stack.filter { $0.format == .ploop1 }.reversed().map(\.path)
        if !deltas.isEmpty {
            _ = try Offline.merge(sources: deltas, destination: out, format: .raw)
        }
        var merged = b.dir.read("out.raw")
        if merged.count < ref.bytes.count { merged += [UInt8](repeating: 0, count: ref.bytes.count - merged.count) }
        expectSame(merged, ref.bytes, "seed \(seed): offline merge of \(stack.map(\.path)): \(log)")
    }
}
