import PloopFormat
import Testing
@testable import PloopImage

struct Ploop1ImageTests {
    @Test(arguments: FormatVersion.allCases)
    func writeReadRoundTrip(_ version: FormatVersion) throws {
        let file = try Fixture.image(clusters: 64, version: version)
        let ref = try Fixture.populate(file, clusters: [0, 5, 63, 7], generation: 1)
        let image = try Ploop1Image(file: file, writable: false)
        for c in 0..<UInt64(64) {
            #expect(try Fixture.read(image, c) == ref[c])
        }
        // Clusters are appended in write order after the header cluster.
        #expect(image.block(of: ClusterIndex(0)) == ImageBlock(1))
        #expect(image.block(of: ClusterIndex(5)) == ImageBlock(2))
        #expect(image.block(of: ClusterIndex(7)) == ImageBlock(4))
        #expect(try file.size() == 5 * UInt64(Fixture.cb))
        #expect(!image.header.inUse)
        #expect(!image.header.flags.contains(.empty))
        let report = try Checker.check(file, options: Fixture.forceReadOnly)
        #expect(report.status == .ok)
        #expect(report.findings.isEmpty)
    }

    @Test func inUseMarkWhileOpenForWriting() throws {
        let file = try Fixture.image(clusters: 8)
        let image = try Ploop1Image(file: file, writable: true)
        #expect(try ImageHeader.decode(file.readBytes(64, at: 0)).inUse)
        // A second writer sees the mark and is refused.
        #expect(throws: ImageError.inUse("<mem>")) { try Ploop1Image(file: file, writable: true) }
        try image.close()
        let h = try ImageHeader.decode(file.readBytes(64, at: 0))
        #expect(!h.inUse)
        #expect(h.flags.contains(.empty))
    }

    @Test func dataIsWrittenBeforeItsIndex() throws {
        let file = try Fixture.image(clusters: 8)
        let image = try Ploop1Image(file: file, writable: true)
        try Fixture.write(image, 3, Fixture.pattern(3, 9))
        // Data is in the file, the BAT entry on disk still zero until flush.
        #expect(try file.readBytes(Fixture.cb, at: UInt64(Fixture.cb)) == Fixture.pattern(3, 9))
        #expect(try file.readBytes(4, at: 64 + 12) == [0, 0, 0, 0])
        try image.flush()
        #expect(try file.readBytes(4, at: 64 + 12) == [1, 0, 0, 0])
        try image.close()
    }

    /// A flush that makes the first data durable also says so in the header: an image a crash
    /// leaves behind (in-use mark still set, never closed) must not claim CIF_Empty while its BAT
    /// maps clusters. Before, only a close or the driver's SYNC cleared the flag.
    @Test func firstFlushOfDataClearsTheEmptyFlag() throws {
        let file = try Fixture.image(clusters: 8)
        let image = try Ploop1Image(file: file, writable: true)
        #expect(try ImageHeader.decode(file.readBytes(64, at: 0)).flags.contains(.empty))
        try Fixture.write(image, 5, Fixture.pattern(5, 1))
        try image.flush()
        // As a crash finds it: no close.
        let h = try ImageHeader.decode(file.readBytes(64, at: 0))
        #expect(h.inUse)
        #expect(!h.flags.contains(.empty))
        #expect(try file.readBytes(4, at: 64 + 4 * 5) == [1, 0, 0, 0])
        try image.close()
    }

    @Test func overwriteStaysInPlace() throws {
        let file = try Fixture.image(clusters: 8)
        _ = try Fixture.populate(file, clusters: [2], generation: 1)
        let image = try Ploop1Image(file: file, writable: true)
        try Fixture.write(image, 2, Fixture.pattern(2, 2))
        try image.close()
        #expect(try file.size() == 2 * UInt64(Fixture.cb))
        #expect(try Fixture.read(Ploop1Image(file: file, writable: false), 2) == Fixture.pattern(2, 2))
    }

    @Test func truncatedBATIsRefused() throws {
        let file = MemoryBlockFile(bytes: Array(try Fixture.image(clusters: 8).contents[0..<100]))
        #expect(throws: ImageError.truncated("<memory>", size: 100, needed: UInt64(Fixture.cb))) {
            try Ploop1Image(file: file, writable: false)
        }
    }

    @Test func v1CannotAddressBlocksPastFourGiBOfSectors() throws {
        // The v1 BAT stores sectors in 32 bits; a block whose sector offset overflows is refused.
        let layout = BATLayout(clusterSectors: 2048, entries: 4, version: .v1)
        #expect(layout.canEncode(ImageBlock(2_097_151)))
        #expect(!layout.canEncode(ImageBlock(2_097_152)))
    }
}

struct GrowTests {
    /// 32 KiB clusters: the first BAT cluster maps 8176 entries; growing past that moves data.
    @Test(arguments: FormatVersion.allCases)
    func growRelocatesClustersInTheWay(_ version: FormatVersion) throws {
        let file = try Fixture.image(clusters: 8000, version: version)
        let ref = try Fixture.populate(file, clusters: [0, 1, 2, 7999, 100], generation: 3)
        let image = try Ploop1Image(file: file, writable: true)
        try image.grow(toSectors: 30_000 * UInt64(Fixture.cs))
        try image.close()
        let reopened = try Ploop1Image(file: file, writable: false)
        #expect(reopened.header.batEntries == 30_000)
        #expect(reopened.header.layout.batClusters == 4)
        for (c, data) in ref { #expect(try Fixture.read(reopened, c) == data) }
        for (_, b) in reopened.allocatedClusters() { #expect(b.value >= 4) }
        #expect(try Fixture.read(reopened, 29_999) == nil)
        let report = try Checker.check(file, options: Fixture.forceReadOnly)
        #expect(report.status == .ok, "\(report.findings)")
    }

    @Test func growWithoutNewBATClustersOnlyRewritesHeader() throws {
        let file = try Fixture.image(clusters: 10)
        let ref = try Fixture.populate(file, clusters: [9], generation: 4)
        let image = try Ploop1Image(file: file, writable: true)
        try image.grow(toSectors: 100 * UInt64(Fixture.cs))
        try image.close()
        let reopened = try Ploop1Image(file: file, writable: false)
        #expect(reopened.header.batEntries == 100)
        #expect(try Fixture.read(reopened, 9) == ref[9])
    }

    @Test func shrinkIsRefusedAndTouchesNothing() throws {
        let file = try Fixture.image(clusters: 10)
        let before = file.contents
        let image = try Ploop1Image(file: file, writable: true)
        #expect(throws: ImageError.shrinkRefused("<mem>", currentSectors: 640, requestedSectors: 64)) {
            try image.grow(toSectors: 64)
        }
        try image.close()
        #expect(file.contents == before)
    }
}

struct MergeTests {
    @Test func topMostCopyWins() throws {
        let base = try Fixture.image(clusters: 32, path: "base")
        let mid = try Fixture.image(clusters: 32, path: "mid")
        let top = try Fixture.image(clusters: 32, path: "top")
        var ref = try Fixture.populate(base, clusters: [0, 1, 2, 3], generation: 1)
        for (k, v) in try Fixture.populate(mid, clusters: [1, 2, 10], generation: 2) { ref[k] = v }
        for (k, v) in try Fixture.populate(top, clusters: [2, 20], generation: 3) { ref[k] = v }
        let dst = try Ploop1Image(file: base, writable: true)
        let summary = try Offline.merge(
            sources: [try Ploop1Image(file: top, writable: false), try Ploop1Image(file: mid, writable: false)],
            into: .ploop1(dst))
        try dst.close()
        #expect(summary.clustersCopied == 4)
        let merged = try Ploop1Image(file: base, writable: false)
        for c in 0..<UInt64(32) { #expect(try Fixture.read(merged, c) == ref[c], "cluster \(c)") }
    }

    /// keepDestination: what the destination maps stays (it served as the top after a reverse
    /// merge's flip, so its copies are the newer ones); only what it lacks comes from the source.
    @Test func keepDestinationCopiesOnlyWhatItLacks() throws {
        let base = try Fixture.image(clusters: 32, path: "base")
        let top = try Fixture.image(clusters: 32, path: "top")
        var ref = try Fixture.populate(base, clusters: [2, 3], generation: 5)
        for (k, v) in try Fixture.populate(top, clusters: [1, 2, 20], generation: 3) where ref[k] == nil { ref[k] = v }
        let dst = try Ploop1Image(file: base, writable: true)
        let summary = try Offline.merge(sources: [try Ploop1Image(file: top, writable: false)], into: .ploop1(dst), keepDestination: true)
        try dst.close()
        #expect(summary.clustersCopied == 2)
        let merged = try Ploop1Image(file: base, writable: false)
        for c in 0..<UInt64(32) { #expect(try Fixture.read(merged, c) == ref[c], "cluster \(c)") }
    }

    @Test func largerSourceGrowsDestination() throws {
        let base = try Fixture.image(clusters: 100, path: "base")
        let top = try Fixture.image(clusters: 9000, path: "top")
        var ref = try Fixture.populate(base, clusters: [1, 2, 3], generation: 1)
        for (k, v) in try Fixture.populate(top, clusters: [2, 8999], generation: 2) { ref[k] = v }
        let dst = try Ploop1Image(file: base, writable: true)
        let s = try Offline.merge(sources: [try Ploop1Image(file: top, writable: false)], into: .ploop1(dst))
        try dst.close()
        #expect(s.destinationGrew)
        let merged = try Ploop1Image(file: base, writable: false)
        #expect(merged.header.batEntries == 9000)
        for (c, d) in ref { #expect(try Fixture.read(merged, c) == d) }
        #expect(try Checker.check(base, options: Fixture.forceReadOnly).status == .ok)
    }

    /// Clusters copied four at a time land where a one-at-a-time copy puts them: the two
    /// destinations are the same bytes, and every cluster reads what the top-most source holds.
    @Test(arguments: [false, true])
    func parallelCopyMakesTheSequentialCopysFile(_ raw: Bool) throws {
        let n: UInt64 = 300
        var results: [[UInt8]] = []
        for streams in [1, 4] {
            let base = try Fixture.image(clusters: n, path: "base")
            let mid = try Fixture.image(clusters: n, path: "mid")
            let top = try Fixture.image(clusters: n, path: "top")
            let below = try Fixture.populate(base, clusters: Array(0..<100), generation: 1)
            var ref = try Fixture.populate(mid, clusters: Array(stride(from: 1, to: n, by: 2)), generation: 2)
            for (k, v) in try Fixture.populate(top, clusters: Array(stride(from: 0, to: n, by: 3)).reversed(), generation: 3) { ref[k] = v }
            let sources = [try Ploop1Image(file: top, writable: false), try Ploop1Image(file: mid, writable: false)]
            let zeros = [UInt8](repeating: 0, count: Fixture.cb)
            if raw {
                let out = MemoryBlockFile(path: "raw", bytes: [UInt8](repeating: 0, count: Int(n) * Fixture.cb))
                let s = try Offline.merge(sources: sources, into: .raw(RawImage(file: out, clusterBytes: Fixture.cb)), copyStreams: streams)
                #expect(s.clustersCopied == ref.count)
                let bytes = out.contents
                results.append(bytes)
                let wrong = (0..<n).filter { c in Array(bytes[Int(c) * Fixture.cb..<Int(c + 1) * Fixture.cb]) != (ref[c] ?? zeros) }
                #expect(wrong.isEmpty, "\(streams) streams: clusters \(wrong.prefix(10)) differ")
            } else {
                let dst = try Ploop1Image(file: base, writable: true)
                let s = try Offline.merge(sources: sources, into: .ploop1(dst), copyStreams: streams)
                try dst.close()
                #expect(s.clustersCopied == ref.count)
                results.append(base.contents)
                let merged = try Ploop1Image(file: base, writable: false)
                let wrong = try (0..<n).filter { c in try Fixture.read(merged, c) != (ref[c] ?? below[c]) }
                #expect(wrong.isEmpty, "\(streams) streams: clusters \(wrong.prefix(10)) differ")
                #expect(try Checker.check(base, options: Fixture.forceReadOnly).status == .ok)
            }
        }
        #expect(results[0] == results[1], "the parallel copy's file differs from the sequential one's")
    }

    @Test func rawDestination() throws {
        let top = try Fixture.image(clusters: 8, path: "top")
        let ref = try Fixture.populate(top, clusters: [1, 6], generation: 5)
        let raw = MemoryBlockFile(path: "raw", bytes: [UInt8](repeating: 0xEE, count: 8 * Fixture.cb))
        _ = try Offline.merge(
            sources: [try Ploop1Image(file: top, writable: false)],
            into: .raw(RawImage(file: raw, clusterBytes: Fixture.cb)))
        let bytes = raw.contents
        for c in 0..<8 {
            let slice = Array(bytes[c * Fixture.cb..<(c + 1) * Fixture.cb])
            #expect(slice == (ref[UInt64(c)] ?? [UInt8](repeating: 0xEE, count: Fixture.cb)))
        }
    }
}
