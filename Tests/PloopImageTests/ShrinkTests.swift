import PloopFormat
import PloopImage
import Testing

/// `Ploop1Image.shrink`: what lies past the new end is dropped, the blocks in use move into the
/// holes below the new file end, and every cluster below the end keeps its bytes.
struct ShrinkTests {
    @Test(arguments: FormatVersion.allCases)
    func shrinkDropsTheTailAndCompacts(_ version: FormatVersion) throws {
        let file = try Fixture.image(clusters: 1000, version: version)
        // Written in this order, the clusters past 500 sit in the file between those below it.
        let ref = try Fixture.populate(file, clusters: [3, 900, 7, 999, 450, 600, 10], generation: 5)
        let image = try Ploop1Image(file: file, writable: true)
        let first = image.firstDataBlock
        try image.shrink(toSectors: 500 * UInt64(Fixture.cs))
        try image.close()
        let reopened = try Ploop1Image(file: file, writable: false)
        #expect(reopened.header.batEntries == 500)
        #expect(reopened.header.sizeInSectors == 500 * UInt64(Fixture.cs))
        #expect(reopened.firstDataBlock == first)
        for (c, data) in ref where c < 500 { #expect(try Fixture.read(reopened, c) == data) }
        // Four clusters stay: the file ends right after the fourth data block.
        #expect(reopened.allocatedCount == 4)
        #expect(try file.size() == UInt64(first + 4) * UInt64(Fixture.cb))
        for (_, b) in reopened.allocatedClusters() { #expect(b.value >= first && b.value < first + 4) }
        let report = try Checker.check(file, options: Fixture.forceReadOnly)
        #expect(report.status == .ok, "\(report.findings)")
    }

    /// A shrink that needs fewer BAT clusters gives them up: the header's first-block offset is
    /// the one its size needs (dm-ploop refuses any other), the data below the end intact.
    @Test func shrinkGivesUpBATClustersItNoLongerNeeds() throws {
        // 32 KiB clusters hold 8176 entries after the header: 20000 entries take 3 clusters.
        let file = try Fixture.image(clusters: 20000)
        let ref = try Fixture.populate(file, clusters: [2, 19999, 400, 12000, 7], generation: 3)
        let image = try Ploop1Image(file: file, writable: true)
        #expect(image.firstDataBlock == 3)
        try image.shrink(toSectors: 500 * UInt64(Fixture.cs))
        try image.close()
        let reopened = try Ploop1Image(file: file, writable: false)
        #expect(reopened.header.firstBlockOffset == reopened.header.layout.firstBlockOffsetSectors)
        #expect(reopened.firstDataBlock == 1)
        for (c, data) in ref where c < 500 { #expect(try Fixture.read(reopened, c) == data) }
        #expect(reopened.allocatedCount == 3)
        let report = try Checker.check(file, options: Fixture.forceReadOnly)
        #expect(report.status == .ok, "\(report.findings)")
    }

    @Test func shrinkToTheSameSizeChangesNothing() throws {
        let file = try Fixture.image(clusters: 10)
        _ = try Fixture.populate(file, clusters: [9], generation: 1)
        let before = file.contents
        let image = try Ploop1Image(file: file, writable: true, markInUse: false)
        try image.shrink(toSectors: 10 * UInt64(Fixture.cs))
        #expect(file.contents == before)
    }
}
