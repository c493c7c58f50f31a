import PloopFormat
import Testing
@testable import PloopImage

/// Power cuts, which are harsher than the kills of CrashTests: what a sync covered survives, but
/// of the changes since, any may be lost, and a long write may be torn (`CrashStates`). Every
/// state must pass `check` as mount runs it (force, drop the in-use mark), and hold every cluster
/// a completed flush acknowledged; an operation that keeps the virtual content (grow, merge)
/// must read the same in every state, and running it again must finish it.
struct PowerCutTests {
    /// The states, checked by `verify`; returns how many there were.
    static func everyState(_ initial: [UInt8], _ log: [RecordingBlockFile.Change], verify: (MemoryBlockFile, CrashStates.State) throws -> Void) throws -> Int {
        let states = CrashStates.enumerate(initial: initial, changes: log, randomSubsets: CrashStates.subsets(8), seed: 16)
        for s in states {
            let mem = MemoryBlockFile(path: "state", bytes: s.bytes)
            let report = try Checker.check(mem, options: Fixture.forceDrop)
            #expect(report.status == .ok && !report.findings.contains { $0.action == .fatal }, "\(s.name): \(report.findings)")
            try verify(mem, s)
        }
        return states.count
    }

    /// Whether `read` is one of `allowed`, sector by sector: an unmapped cluster only where nil is
    /// allowed; a mapped one where each 512-byte sector is that sector of an allowed version (a
    /// torn overwrite mixes the versions, never brings in anything else).
    static func sectorwise(_ read: [UInt8]?, _ allowed: [[UInt8]?]) -> Bool {
        guard let r = read else { return allowed.contains { $0 == nil } }
        let versions = allowed.compactMap { $0 }.filter { $0.count == r.count }
        return stride(from: 0, to: r.count, by: 512).allSatisfy { at in
            versions.contains { v in v[at..<min(at + 512, r.count)] == r[at..<min(at + 512, r.count)] }
        }
    }

    /// What a cluster read, in a few words: unmapped, a pattern (cluster, generation), or other.
    static func describe(_ read: [UInt8]?, _ cluster: UInt64) -> String {
        guard let r = read else { return "nothing (unmapped)" }
        for g in UInt8(0)...9 where r == Fixture.pattern(cluster, g) { return "generation \(g)" }
        let owner = r.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        return "other bytes (cluster field \(owner), byte 8 = \(r[8]))"
    }

    @Test(arguments: FormatVersion.allCases)
    func growKeepsEveryClusterThroughAnyPowerCut(_ version: FormatVersion) throws {
        let file = try Fixture.image(clusters: 8000, version: version)
        let ref = try Fixture.populate(file, clusters: [0, 1, 2, 3, 7999], generation: 7)
        let rec = RecordingBlockFile(MemoryBlockFile(path: "grow", bytes: file.contents))
        let newSectors = 20_000 * UInt64(Fixture.cs)
        let image = try Ploop1Image(file: rec, writable: true)
        try image.grow(toSectors: newSectors)
        try image.close()
        let n = try Self.everyState(file.contents, rec.changes) { mem, s in
            let got = try Ploop1Image(file: mem, writable: false)
            #expect(got.header.batEntries == 8000 || got.header.batEntries == 20_000, "\(s.name)")
            for (c, d) in ref { #expect(try Fixture.read(got, c) == d, "\(s.name), cluster \(c)") }
            let again = try Ploop1Image(file: mem, writable: true)
            try again.grow(toSectors: newSectors)
            try again.close()
            let done = try Ploop1Image(file: mem, writable: false)
            for (c, d) in ref { #expect(try Fixture.read(done, c) == d, "\(s.name), grown again, cluster \(c)") }
        }
        print("power-cut states: grow v\(version.rawValue) relocating 4 clusters: \(n)")
        #expect(n > 5)
    }

    @Test func mergeKeepsEveryClusterThroughAnyPowerCut() throws {
        let stage = try Fixture.mergeStage()
        let (base, topImage, old, new, merged) = (stage.base, stage.top, stage.old, stage.new, stage.merged)
        let rec = RecordingBlockFile(MemoryBlockFile(path: "merge", bytes: base.contents))
        let dst = try Ploop1Image(file: rec, writable: true)
        _ = try Offline.merge(sources: [topImage], into: .ploop1(dst), flushEvery: 2)
        try dst.close()
        let n = try Self.everyState(base.contents, rec.changes) { mem, s in
            let got = try Ploop1Image(file: mem, writable: false)
            for c in Set(old.keys).union(new.keys) {
                let read = try Fixture.read(got, c)
                // An overwrite in place that a flush had not acknowledged may be torn, sector by
                // sector, as on any disk; the top still holds the whole copy until the merge ends.
                let ok = Self.sectorwise(read, [old[c], merged[c]])
                #expect(ok, "\(s.name), cluster \(c): \(Self.describe(read, c))")
            }
            let again = try Ploop1Image(file: mem, writable: true)
            _ = try Offline.merge(sources: [topImage], into: .ploop1(again))
            try again.close()
            let done = try Ploop1Image(file: mem, writable: false)
            for (c, d) in merged { #expect(try Fixture.read(done, c) == d, "\(s.name), merged again, cluster \(c)") }
        }
        print("power-cut states: offline merge of 3 clusters: \(n)")
        #expect(n > 10)
    }

    /// Guest writes: allocating, overwriting, more allocating, each batch then a flush, and a
    /// last batch never flushed. A cluster reads what the last acknowledged flush saw, or what
    /// was written after it; never zeros once acknowledged, never another cluster's data.
    @Test func guestWritesKeepWhatEachFlushAcknowledged() throws {
        let file = try Fixture.image(clusters: 64)
        let rec = RecordingBlockFile(MemoryBlockFile(path: "guest", bytes: file.contents))
        let image = try Ploop1Image(file: rec, writable: true)
        // (cluster, generation) per batch; a flush after every batch but the last.
        let batches: [[(UInt64, UInt8)]] = [[(3, 1), (7, 1)], [(3, 2), (9, 1), (10, 1)], [(7, 2), (11, 1), (3, 3)], [(12, 1), (9, 2)]]
        var written: [UInt64: [UInt8]] = [:]  // every generation each cluster was given, in order
        var acknowledged: [(changes: Int, values: [UInt64: UInt8])] = []
        var current: [UInt64: UInt8] = [:]
        for (i, batch) in batches.enumerated() {
            for (c, g) in batch {
                try Fixture.write(image, c, Fixture.pattern(c, g))
                written[c, default: []].append(g)
                current[c] = g
            }
            if i < batches.count - 1 {
                try image.flush()
                acknowledged.append((rec.changes.count, current))
            }
        }
        let n = try Self.everyState(file.contents, rec.changes) { mem, s in
            let got = try Ploop1Image(file: mem, writable: false)
            let acked = acknowledged.last { $0.changes <= s.durableChanges }?.values ?? [:]
            for (c, gens) in written {
                let read = try Fixture.read(got, c)
                // Allowed: the acknowledged generation and any written after it; zeros (unmapped)
                // only while nothing of this cluster was acknowledged.
                let from = acked[c].flatMap { g in gens.firstIndex(of: g) } ?? 0
                var allowed = gens[from...].map { Optional(Fixture.pattern(c, $0)) }
                if acked[c] == nil { allowed.append(nil) }
                let ok = Self.sectorwise(read, allowed)
                #expect(ok, "\(s.name), cluster \(c): acknowledged \(acked[c].map(String.init) ?? "nothing"), read \(Self.describe(read, c))")
            }
        }
        print("power-cut states: guest writes, 4 batches and 3 flushes: \(n)")
        #expect(n > 10)
    }

    /// `check -f` repairing what a dead device left (the in-use mark set, a block written but
    /// never flushed past the last mapped one) may itself be cut at any point: every state still
    /// passes check and keeps the flushed clusters; a repaired state is clean for a read-only check.
    @Test func checkRepairOfADeadDevicesImageSurvivesAnyPowerCut() throws {
        let file = try Fixture.image(clusters: 64)
        let image = try Ploop1Image(file: file, writable: true)
        for c: UInt64 in [3, 9] { try Fixture.write(image, c, Fixture.pattern(c, 1)) }
        try image.flush()
        try Fixture.write(image, 12, Fixture.pattern(12, 1))  // never flushed: a leaked block
        let crashed = file.contents
        let rec = RecordingBlockFile(MemoryBlockFile(path: "repair", bytes: crashed))
        let report = try Checker.check(rec, options: Fixture.forceDrop)
        #expect(report.status == .ok, "\(report.findings)")
        #expect(!rec.changes.isEmpty, "check repaired nothing: the stage is wrong")
        let n = try Self.everyState(crashed, rec.changes) { mem, s in
            let got = try Ploop1Image(file: mem, writable: false)
            for c: UInt64 in [3, 9] {
                let read = try Fixture.read(got, c)
                let ok = read == Fixture.pattern(c, 1)
                #expect(ok, "\(s.name), cluster \(c): \(Self.describe(read, c))")
            }
            #expect(try Fixture.read(got, 12) == nil, "\(s.name): an unflushed cluster appeared")
            #expect(try Checker.check(mem, options: Fixture.forceReadOnly).status == .ok, "\(s.name)")
        }
        print("power-cut states: check -f of a dead device's image: \(n)")
        #expect(n >= 2)
    }

}
