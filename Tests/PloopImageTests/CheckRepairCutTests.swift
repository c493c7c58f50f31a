import Glibc
import PloopFormat
import PloopSystem
import Testing
@testable import PloopImage

/// `check -F` giving each later owner of a shared block its own copy, cut by a power cut at any
/// point or failing at any step: every cluster keeps reading what it read before, and check -F
/// run again finishes the repair.
struct CheckRepairCutTests {
    /// Clusters 3, 5 and 9 with data; clusters 20 and 21 also point at cluster 5's block.
    static func sharedImage() throws -> (bytes: [UInt8], expected: [UInt64: [UInt8]]) {
        let file = try Fixture.image(clusters: 64)
        let image = try Ploop1Image(file: file, writable: true)
        for c: UInt64 in [3, 5, 9] { try Fixture.write(image, c, Fixture.pattern(c, 1)) }
        try image.close()
        let block5 = try #require(try Ploop1Image(file: file, writable: false).allocatedClusters().first { $0.0.value == 5 }?.1)
        for c: UInt64 in [20, 21] { try CheckCatalogueTests.poke32(file, CheckCatalogueTests.entry(c), block5.value) }
        var expected: [UInt64: [UInt8]] = [:]
        for c: UInt64 in [3, 5, 9] { expected[c] = Fixture.pattern(c, 1) }
        for c: UInt64 in [20, 21] { expected[c] = Fixture.pattern(5, 1) }
        return (file.contents, expected)
    }

    static var hardForce: Checker.Options {
        var o = Fixture.forceDrop
        o.hardForce = true
        return o
    }

    /// Each cluster reads what it read before the repair; check -F again leaves a clean image
    /// that still does.
    static func expectIntactAndFinished(_ bytes: [UInt8], _ expected: [UInt64: [UInt8]], _ at: String) throws {
        let mem = MemoryBlockFile(path: "state", bytes: bytes)
        for pass in ["as left", "after check -F again"] {
            let image = try Ploop1Image(file: mem, writable: false, allowDirty: true)
            for (c, want) in expected.sorted(by: { $0.key < $1.key }) {
                let read = try Fixture.read(image, c)
                #expect(read == want, "\(at), \(pass): cluster \(c) reads \(PowerCutTests.describe(read, c))")
            }
            if pass == "as left" {
                let r = try Checker.check(mem, options: hardForce)
                #expect(r.status == .ok, "\(at): check -F again: \(r.findings.map(\.message))")
            }
        }
        let clean = try Checker.check(mem, options: Fixture.forceReadOnly)
        #expect(clean.status == .ok && clean.findings.isEmpty, "\(at): after check -F again: \(clean.findings.map(\.message))")
    }

    @Test func everyPowerCutStateKeepsEveryClusterAndCheckFinishes() throws {
        let (initial, expected) = try Self.sharedImage()
        let rec = RecordingBlockFile(MemoryBlockFile(path: "shared", bytes: initial))
        let report = try Checker.check(rec, options: Self.hardForce)
        #expect(report.status == .ok && report.findings.filter { if case .usedTwice = $0.problem { true } else { false } }.count == 2, "\(report.findings)")
        let states = CrashStates.enumerate(initial: initial, changes: rec.changes, randomSubsets: CrashStates.subsets(8), seed: 5)
        for s in states { try Self.expectIntactAndFinished(s.bytes, expected, s.name) }
        #expect(states.count >= 4)
        print("power-cut states: check -F separating 2 shared blocks: \(states.count)")
    }

    @Test(arguments: [false, true])
    func anIOErrorAtEveryStepLeavesARepairableImage(_ sticky: Bool) throws {
        let (initial, expected) = try Self.sharedImage()
        var failed = 0
        for n in 0..<200 {
            let errno = n % 2 == 0 ? EIO : ENOSPC
            let budget = CrashBudget(n, failure: .error(errno, sticky: sticky))
            let mem = MemoryBlockFile(path: "shared", bytes: initial)
            let at = "\(SystemError.words(errno))\(sticky ? " from" : " at") step \(n)"
            do {
                let r = try Checker.check(CrashingBlockFile(mem, budget: budget), options: Self.hardForce)
                if !budget.fired {
                    #expect(r.status == .ok)
                    break
                }
            } catch {
                failed += 1
                #expect("\(error)".contains("shared") && "\(error)".contains(SystemError.words(errno)), "\(at): \(error)")
            }
            try Self.expectIntactAndFinished(mem.contents, expected, at)
        }
        #expect(failed >= 4, "only \(failed) steps failed: the hook is not reached")
        print("faults injected: check -F\(sticky ? " (sticky)" : ""): \(failed) failed")
    }
}
