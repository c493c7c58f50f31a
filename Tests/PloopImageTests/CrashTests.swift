import PloopFormat
import Testing
@testable import PloopImage

/// Stops grow and merge after each of their writes, truncates or syncs (the injectable file layer),
/// then proves the image passes `check` (as mount runs it: force + drop the in-use mark), holds the
/// old or the new content of every cluster, and that running the operation again finishes it.
struct CrashTests {
    /// Runs `operation` against copies of `bytes` crashing at call 0, 1, 2 … until one completes.
    static func everyCrashPoint(
        _ bytes: [UInt8], _ operation: (any BlockFile) throws -> Void,
        verify: (MemoryBlockFile, Int) throws -> Void
    ) throws -> Int {
        var n = 0
        while true {
            let mem = MemoryBlockFile(path: "crash", bytes: bytes)
            let crashing = CrashingBlockFile(mem, crashAt: n)
            do {
                try operation(crashing)
                return n
            } catch ImageError.injectedCrash {
                try verify(mem, n)
            }
            n += 1
            #expect(n < 10_000, "operation never completed")
            if n >= 10_000 { return n }
        }
    }

    @Test(arguments: FormatVersion.allCases)
    func growCrashesLoseNothing(_ version: FormatVersion) throws {
        let file = try Fixture.image(clusters: 8000, version: version)
        let ref = try Fixture.populate(file, clusters: [0, 1, 2, 3, 7999], generation: 7)
        let newSectors = 20_000 * UInt64(Fixture.cs)
        let points = try Self.everyCrashPoint(file.contents, { f in
            let image = try Ploop1Image(file: f, writable: true)
            try image.grow(toSectors: newSectors)
            try image.close()
        }, verify: { mem, n in
            let report = try Checker.check(mem, options: Fixture.forceDrop)
            #expect(report.status == .ok, "crash at \(n): \(report.findings)")
            #expect(!report.findings.contains { $0.action == .fatal })
            let image = try Ploop1Image(file: mem, writable: false)
            #expect(image.header.batEntries == 8000 || image.header.batEntries == 20_000)
            for (c, d) in ref { #expect(try Fixture.read(image, c) == d, "crash at \(n), cluster \(c)") }
            // Running grow again finishes it.
            let again = try Ploop1Image(file: mem, writable: true)
            try again.grow(toSectors: newSectors)
            try again.close()
            let done = try Ploop1Image(file: mem, writable: false)
            #expect(done.header.batEntries == 20_000)
            for (c, d) in ref { #expect(try Fixture.read(done, c) == d) }
            #expect(try Checker.check(mem, options: Fixture.forceReadOnly).status == .ok)
        })
        #expect(points > 10)  // relocation of 3 clusters takes many steps; each was a crash point
    }

    @Test func mergeCrashesLoseNothing() throws {
        let stage = try Fixture.mergeStage()
        let (base, topImage, old, new, merged) = (stage.base, stage.top, stage.old, stage.new, stage.merged)
        let points = try Self.everyCrashPoint(base.contents, { f in
            let dst = try Ploop1Image(file: f, writable: true)
            _ = try Offline.merge(sources: [topImage], into: .ploop1(dst), flushEvery: 1)
            try dst.close()
        }, verify: { mem, n in
            let report = try Checker.check(mem, options: Fixture.forceDrop)
            #expect(report.status == .ok, "crash at \(n): \(report.findings)")
            let image = try Ploop1Image(file: mem, writable: false)
            for c in Set(old.keys).union(new.keys) {
                let got = try Fixture.read(image, c)
                #expect(got == old[c] || got == merged[c], "crash at \(n), cluster \(c)")
            }
            // The same merge again finishes it.
            let dst = try Ploop1Image(file: mem, writable: true)
            _ = try Offline.merge(sources: [topImage], into: .ploop1(dst))
            try dst.close()
            let done = try Ploop1Image(file: mem, writable: false)
            for (c, d) in merged { #expect(try Fixture.read(done, c) == d) }
            #expect(try Checker.check(mem, options: Fixture.forceReadOnly).status == .ok)
        })
        #expect(points > 5)
    }
}
