import PloopDevice
import PloopFormat
import PloopImage
import Synchronization
import Testing

/// Stops the model after each of its writes to the files during snapshot, merge and grow. Every
/// state left behind passes `check` (as mount runs it) and the stack as it was before the operation
/// still reads every flushed write.
struct ModelCrashTests {
    static let cs: UInt32 = 64
    static var cb: Int { Int(cs) * 512 }

    enum Op: String, CaseIterable, Sendable { case snapshot, mergeTop, mergeLower, mergeAll, grow }

    /// Three levels with data in memory, bytes per path.
    static func template() throws -> [String: [UInt8]] {
        var out: [String: [UInt8]] = [:]
        for (i, name) in ["l0", "l1", "l2"].enumerated() {
            let f = MemoryBlockFile(path: name)
            try Ploop1Image.create(on: f, header: try ImageHeader.new(sizeSectors: 8000 * UInt64(cs), clusterSectors: cs, version: .v2))
            let img = try Ploop1Image(file: f, writable: true)
            for c in stride(from: UInt64(i), to: UInt64(40), by: i + 2) {
                let data = Pattern.cluster(c, tag: UInt8(i + 1), size: cb)
                try data.withUnsafeBytes { try img.write(cluster: ClusterIndex(c), data: $0) }
            }
            try img.close()
            out[name] = f.contents
        }
        return out
    }

    static func read(_ opener: MemoryOpener, _ paths: [String], bytes: Int) throws -> [UInt8] {
        let m = try DeviceModel(MountRequest(images: paths, readOnly: true), opener: opener)
        var out = [UInt8](repeating: 0, count: bytes)
        try out.withUnsafeMutableBytes { try m.read(into: $0, at: 0) }
        return out
    }

    @Test(arguments: Op.allCases)
    func everyCrashPointKeepsTheOldStack(_ op: Op) throws {
        let files = try Self.template()
        let span = 48 * Self.cb
        // The content every surviving stack must show (after a few more flushed writes).
        var expected: [UInt8]?
        var n = 0
        var completed = false
        while !completed {
            let budget = CrashBudget()
            let opener = MemoryOpener(wrap: { CrashingBlockFile($0, budget: budget) })
            for (p, bytes) in files { opener.add(p, MemoryBlockFile(path: p, bytes: bytes)) }
            let model = try DeviceModel(MountRequest(images: ["l0", "l1", "l2"]), opener: opener)
            let data = Pattern.bytes(3 * Self.cb, seed: 77)
            try data.withUnsafeBytes { try model.write($0, at: UInt64(Self.cb / 2)) }
            try model.flush()
            if expected == nil {
                var e = [UInt8](repeating: 0, count: span)
                try e.withUnsafeMutableBytes { try model.read(into: $0, at: 0) }
                expected = e
            }
            budget.arm(n)
            do {
                try ModelFaultTests.run(op, on: model)
                completed = true
            } catch {
                guard error == .image(.injectedCrash) else { throw error }
            }
            budget.disarm()
            // What a crash leaves: each image repairs with check -d, and the old stack reads as before.
            for p in opener.paths {
                guard let f = opener.file(p), (try? ImagePath.detectFormat(f)) == .ploop1, (try? f.size()) ?? 0 >= 64 else { continue }
                if (try? Ploop1Image(file: f, writable: false)) == nil { continue }  // a snapshot file cut before its header
                var o = Checker.Options()
                o.force = true
                o.dropInUse = true
                let r = try Checker.check(f, options: o)
                #expect(r.status == .ok, "\(op) crash at \(n): \(p): \(r.findings.map(\.message))")
            }
            if !completed {
                expectSame(try Self.read(opener, ["l0", "l1", "l2"], bytes: span), expected!, "\(op) crash at \(n)")
            } else {
                let stack = model.imagePaths
                try model.stop()
                expectSame(try Self.read(opener, stack, bytes: span), expected!, "\(op) completed")
            }
            n += 1
            if n > 5000 { Issue.record("\(op) never completed"); break }
        }
        #expect(n > 3)
    }
}
