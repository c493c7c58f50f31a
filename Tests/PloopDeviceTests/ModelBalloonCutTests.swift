import Glibc
import PloopDevice
import PloopFormat
import PloopImage
import PloopSystem
import Testing

/// The balloon's relocation (PLOOP_IOC_RELOCBLKS: the image's tail moved into blocks the balloon
/// freed, then the file cut) under a power cut at any point and with an I/O error at each of its
/// file changes. Every cluster outside the balloon keeps its bytes (balloon clusters are
/// don't-care, as the file system does not use them), the image passes `check` as mount runs it,
/// and, after an error, the same call finishes the relocation.
struct ModelBalloonCutTests {
    static let cs = ModelCrashTests.cs
    static let cb = ModelCrashTests.cb
    static let clusters = 64
    /// Clusters the balloon file holds; the first three are taken over by new writes before the
    /// relocation, the rest are relocation targets.
    static let balloon: [UInt32] = Array(10..<20) + Array(30..<35)
    static let written: [UInt64] = [100, 101, 102]

    /// One v2 image with clusters 0..<64 written in order (cluster c in block c + first data block).
    static func template() throws -> [UInt8] {
        let f = MemoryBlockFile(path: "l0")
        try Ploop1Image.create(on: f, header: try ImageHeader.new(sizeSectors: 8000 * UInt64(cs), clusterSectors: cs, version: .v2))
        let img = try Ploop1Image(file: f, writable: true)
        for c in 0..<UInt64(clusters) {
            try Pattern.cluster(c, tag: 1, size: cb).withUnsafeBytes { try img.write(cluster: ClusterIndex(c), data: $0) }
        }
        try img.close()
        return f.contents
    }

    /// Mounts l0, inflates the balloon, loads its blocks as free, writes three new clusters (they
    /// take free blocks) and flushes. Returns the model, the frozen head, the tail to relocate and
    /// what the device reads (balloon clusters excluded).
    static func prepare(_ opener: MemoryOpener) throws -> (DeviceModel, UInt32, [RelocExtent], [UInt64: [UInt8]]) {
        let model = try DeviceModel(MountRequest(images: ["l0"]), opener: opener)
        let bat = try Ploop1Image(file: opener.file("l0")!, writable: false)
        let free = balloon.map { (cluster: $0, block: bat.block(of: ClusterIndex(UInt64($0)))!.value) }
        _ = try model.balloon(inflate: true, keepIntact: false)
        let head = try model.loadFreeBlocks(level: 0, extents: FreeExtent.coalescing(free))
        var expected: [UInt64: [UInt8]] = [:]
        for c in 0..<UInt64(clusters) where !balloon.contains(UInt32(c)) { expected[c] = Pattern.cluster(c, tag: 1, size: cb) }
        for c in written {
            let data = Pattern.cluster(c, tag: 9, size: cb)
            try data.withUnsafeBytes { try model.write($0, at: c * UInt64(cb)) }
            expected[c] = data
        }
        try model.flush()
        // The tail as user space computes it: the last blocks, as many as free blocks are left.
        let owners = try Ploop1Image(file: opener.file("l0")!, writable: false).owners()
        let left = UInt32(balloon.count - written.count)
        let tail = ((head - left)..<head).compactMap { blk in owners[blk].map { RelocExtent(cluster: UInt32($0.value), block: blk, length: 1, free: false) } }
        return (model, head, tail, expected)
    }

    static func expectContent(_ file: MemoryBlockFile, _ expected: [UInt64: [UInt8]], _ at: String) throws {
        let o = MemoryOpener()
        o.add("l0", MemoryBlockFile(path: "l0", bytes: file.contents))
        let m = try DeviceModel(MountRequest(images: ["l0"], readOnly: true), opener: o)
        var buf = [UInt8](repeating: 0, count: cb)
        for (c, want) in expected.sorted(by: { $0.key < $1.key }) {
            try buf.withUnsafeMutableBytes { try m.read(into: $0, at: c * UInt64(cb)) }
            if buf != want { Issue.record("\(at): cluster \(c) lost its bytes"); return }
        }
    }

    static var mountCheck: Checker.Options { ModelPowerCutTests.mountCheck }

    @Test func everyPowerCutStateKeepsEveryCluster() throws {
        let log = ChangeLog()
        let opener = MemoryOpener(wrap: { RecordingBlockFile($0, shared: log) })
        opener.add("l0", MemoryBlockFile(path: "l0", bytes: try Self.template()))
        let (model, head, tail, expected) = try Self.prepare(opener)
        #expect(tail.count == Self.balloon.count - Self.written.count)
        let initial = ["l0": opener.file("l0")!.contents]
        let start = log.count
        let cut = try model.relocateBlocks(level: 0, allocHead: head, extents: tail)
        #expect(cut == UInt32(tail.count))
        let changes = Array(log.all[start...])
        let states = CrashStates.enumerate(initial: initial, log: changes, randomSubsets: CrashStates.subsets(4), seed: 41)
        for state in states {
            let f = MemoryBlockFile(path: "l0", bytes: state.files["l0"]!)
            let r = try Checker.check(f, options: Self.mountCheck)
            #expect(r.status == .ok, "\(state.name): \(r.findings.map(\.message))")
            try Self.expectContent(f, expected, state.name)
        }
        // Every change kept: the file is shorter by the relocated blocks and reads the same.
        try model.stop()
        let final = opener.file("l0")!
        #expect(final.contents.count == initial["l0"]!.count - tail.count * Self.cb)
        try Self.expectContent(final, expected, "every change kept")
        #expect(changes.count > 10)
        print("power-cut states: balloon relocation and truncate: \(states.count) from \(changes.count) changes")
    }

    @Test(arguments: [false, true])
    func anIOErrorAtEveryChangeLeavesAWorkingDeviceAndTheCallFinishes(_ sticky: Bool) throws {
        let template = try Self.template()
        var failed = 0
        for n in 0..<500 {
            let errno = n % 2 == 0 ? EIO : ENOSPC
            let budget = CrashBudget(failure: .error(errno, sticky: sticky))
            let opener = MemoryOpener(wrap: { CrashingBlockFile($0, budget: budget) })
            opener.add("l0", MemoryBlockFile(path: "l0", bytes: template))
            let (model, head, tail, expected) = try Self.prepare(opener)
            let at = "\(SystemError.words(errno))\(sticky ? " from" : " at") change \(n)"
            budget.arm(n)
            var completed = false
            do {
                _ = try model.relocateBlocks(level: 0, allocHead: head, extents: tail)
                completed = !budget.fired
            } catch {
                failed += 1
                let text = "\(error)"
                #expect(text.contains(SystemError.words(errno)) && text.contains("l0"), "\(at): \(text)")
            }
            budget.disarm()
            // The device still reads every cluster; the same call finishes the relocation.
            var buf = [UInt8](repeating: 0, count: Self.cb)
            for (c, want) in expected {
                try buf.withUnsafeMutableBytes { try model.read(into: $0, at: c * UInt64(Self.cb)) }
                #expect(buf == want, "\(at): cluster \(c) reads other bytes after the failure")
            }
            if !completed {
                #expect(model.state == .reloc, "\(at)")
                _ = try model.relocateBlocks(level: 0, allocHead: head, extents: tail)
            }
            #expect(model.state == .off, "\(at)")
            try model.stop()
            let f = opener.file("l0")!
            let r = try Checker.check(f, options: Self.mountCheck)
            #expect(r.status == .ok, "\(at): \(r.findings.map(\.message))")
            #expect(f.contents.count == template.count - tail.count * Self.cb, "\(at): the image was not cut")
            try Self.expectContent(f, expected, at)
            if completed { break }
        }
        print("faults injected: balloon relocation\(sticky ? " (sticky)" : ""): \(failed) failed")
        #expect(failed > 5)
    }
}
