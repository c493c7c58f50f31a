import Testing
@testable import PloopFormat

private func hex(_ s: String) -> [UInt8] {
    var out: [UInt8] = []
    var i = s.startIndex
    while i < s.endIndex {
        let j = s.index(i, offsetBy: 2)
        out.append(UInt8(s[i..<j], radix: 16)!)
        i = j
    }
    return out
}

/// Golden headers: bytes produced independently (Python `struct.pack('<…')` from the field table in
/// the reference), compared with our encoder and decoded back.
struct HeaderGoldenTests {
    struct Golden: Sendable, CustomTestStringConvertible {
        var name: String
        var sizeSectors: UInt64
        var clusterSectors: UInt32
        var version: FormatVersion
        var inUse: Bool
        var bytes: String
        var testDescription: String { name }
    }

    static let goldens: [Golden] = [
        // The reference's worked example: 10 GiB, 1 MiB clusters, v2: m_Size 10240, CHS 16/40960, one BAT cluster.
        Golden(name: "10 GiB v2 1 MiB", sizeSectors: 20_971_520, clusterSectors: 2048, version: .v2, inUse: false,
               bytes: "576974686f7546726553706163457874020000001000000000a00000000800000028000000004001000000000000000000080000010000000000000000000000"),
        // 1 GiB falls in the 16×63 CHS range: 2080 cylinders (the original's value; qemu writes 4096).
        Golden(name: "1 GiB v1 1 MiB", sizeSectors: 2_097_152, clusterSectors: 2048, version: .v1, inUse: false,
               bytes: "576974686f7574467265655370616365020000001000000020080000000800000004000000002000000000000000000000080000010000000000000000000000"),
        Golden(name: "256 MiB v2 64 KiB", sizeSectors: 524_288, clusterSectors: 128, version: .v2, inUse: false,
               bytes: "576974686f7546726553706163457874020000001000000000040000800000000010000000000800000000000000000080000000010000000000000000000000"),
        Golden(name: "1 GiB v2 4 MiB in use, with data", sizeSectors: 2_097_152, clusterSectors: 8192, version: .v2, inUse: true,
               bytes: "576974686f754672655370616345787402000000100000002008000000200000000100000000200000000000596e6f7400200000000000000000000000000000"),
    ]

    @Test(arguments: goldens)
    func encodesAndDecodes(_ g: Golden) throws {
        var h = try ImageHeader.new(sizeSectors: g.sizeSectors, clusterSectors: g.clusterSectors, version: g.version)
        if g.inUse {
            h.inUse = true
            h.flags.remove(.empty)
        }
        #expect(h.encode() == hex(g.bytes))
        let decoded = try ImageHeader.decode(hex(g.bytes))
        #expect(decoded == h)
        #expect(decoded.inUse == g.inUse)
    }

    @Test func workedExampleFields() throws {
        let h = try ImageHeader.new(sizeSectors: 20_971_520, clusterSectors: 2048, version: .v2)
        #expect(h.batEntries == 10240)
        #expect(h.heads == 16 && h.cylinders == 40960)
        #expect(h.firstBlockOffset == 2048)
        #expect(h.layout.batClusters == 1)
        #expect(h.layout.encode(ImageBlock(1)) == 1)
        let v1 = try ImageHeader.new(sizeSectors: 20_971_520, clusterSectors: 2048, version: .v1)
        #expect(v1.layout.encode(ImageBlock(1)) == 2048)
    }

    @Test func sizeRoundsUpToCluster() throws {
        let h = try ImageHeader.new(sizeSectors: 2049, clusterSectors: 2048, version: .v2)
        #expect(h.sizeInSectors == 4096)
        #expect(h.batEntries == 2)
    }

    @Test func v1RefusesWhatItCannotHold() {
        #expect(throws: FormatError.self) {
            try ImageHeader.new(sizeSectors: 4_294_967_296, clusterSectors: 2048, version: .v1)
        }
        // 2 TiB fits v2.
        #expect(throws: Never.self) {
            try ImageHeader.new(sizeSectors: 4_294_967_296, clusterSectors: 2048, version: .v2)
        }
    }

    @Test func capsAt50TiB() {
        #expect(throws: FormatError.sizeTooLarge(sectors: PloopSpec.maxImageSectors + 1, limit: PloopSpec.maxImageSectors, version: nil)) {
            try ImageHeader.new(sizeSectors: PloopSpec.maxImageSectors + 1, clusterSectors: 2048, version: .v2)
        }
    }

    @Test func invalidClusterSizesAreRefused() {
        for bad: UInt32 in [0, 1, 8, 63, 96, 262_144, 3000] {
            #expect(throws: FormatError.invalidClusterSize(sectors: bad)) {
                try ImageHeader.new(sizeSectors: 1 << 20, clusterSectors: bad, version: .v2)
            }
        }
    }

    @Test func batGrowsPastOneCluster() throws {
        // 1 MiB clusters map 262128 entries in the first cluster; one more entry needs a second cluster.
        let one = BATLayout(clusterSectors: 2048, entries: 262_128, version: .v2)
        let two = BATLayout(clusterSectors: 2048, entries: 262_129, version: .v2)
        #expect(one.batClusters == 1)
        #expect(two.batClusters == 2)
        #expect(two.firstDataOffset == 2 << 20)
        #expect(one.entryOffset(ClusterIndex(3)) == 76)
    }
}

/// Each way a header can be wrong gives its own error.
struct HeaderDecodeErrorTests {
    static func valid() -> [UInt8] {
        try! ImageHeader.new(sizeSectors: 2_097_152, clusterSectors: 2048, version: .v2).encode()
    }

    static func patched(_ offset: Int, _ value: UInt32) -> [UInt8] {
        var b = valid()
        LittleEndian.put(value, &b, offset)
        return b
    }

    @Test func truncated() {
        #expect(throws: FormatError.truncatedHeader(length: 10)) { try ImageHeader.decode(Array(Self.valid()[0..<10])) }
        #expect(throws: FormatError.truncatedHeader(length: 0)) { try ImageHeader.decode([]) }
    }

    @Test func badSignature() {
        var b = Self.valid()
        b[15] = UInt8(ascii: "X")
        #expect(throws: FormatError.badSignature(found: "WithouFreSpacExX")) { try ImageHeader.decode(b) }
    }

    @Test func wrongType() {
        #expect(throws: FormatError.wrongType(3)) { try ImageHeader.decode(Self.patched(16, 3)) }
    }

    @Test func zeroClusterSize() {
        #expect(throws: FormatError.invalidClusterSize(sectors: 0)) { try ImageHeader.decode(Self.patched(28, 0)) }
    }

    @Test func firstBlockOffsetNotAligned() {
        #expect(throws: FormatError.badFirstBlockOffset(sectors: 1000, clusterSectors: 2048)) {
            try ImageHeader.decode(Self.patched(48, 1000))
        }
        #expect(throws: FormatError.badFirstBlockOffset(sectors: 0, clusterSectors: 2048)) {
            try ImageHeader.decode(Self.patched(48, 0))
        }
    }

    @Test func sizeLargerThanBAT() {
        // qemu's c08: nb_sectors bigger than the BAT maps.
        var b = Self.valid()
        LittleEndian.put(UInt64(4_194_304), &b, 36)
        #expect(throws: FormatError.sizeBeyondBAT(sizeSectors: 4_194_304, entries: 1024, clusterSectors: 2048)) {
            try ImageHeader.decode(b)
        }
    }

    @Test func hugeCatalog() {
        // qemu's c09: 0x7fffffff entries; the size no longer needs them.
        #expect(throws: FormatError.batEntriesMismatch(entries: 0x7fff_ffff, expected: 1024)) {
            try ImageHeader.decode(Self.patched(32, 0x7fff_ffff))
        }
    }

    @Test func batDoesNotFitBeforeData() {
        // 300000 entries need two 1 MiB BAT clusters, but data starts after one.
        var b = Self.patched(32, 300_000)
        LittleEndian.put(UInt64(300_000) * 2048, &b, 36)
        #expect(throws: FormatError.batDoesNotFit(entries: 300_000, firstBlockOffset: 2048)) { try ImageHeader.decode(b) }
    }

    @Test func unknownFlags() {
        #expect(throws: FormatError.unknownFlags(0x10)) { try ImageHeader.decode(Self.patched(52, 0x10)) }
    }

    @Test func zeroSize() {
        var b = Self.valid()
        LittleEndian.put(UInt64(0), &b, 36)
        #expect(throws: FormatError.sizeZero) { try ImageHeader.decode(b) }
    }

    @Test func v1EntriesMustBeAligned() throws {
        let layout = BATLayout(clusterSectors: 2048, entries: 10, version: .v1)
        #expect(throws: FormatError.v1EntryMisaligned(entry: 2049, clusterSectors: 2048)) { try layout.decode(2049) }
        #expect(try layout.decode(4096) == ImageBlock(2))
    }

    @Test func v1SizeReadsOnly32Bits() throws {
        var b = try ImageHeader.new(sizeSectors: 2_097_152, clusterSectors: 2048, version: .v1).encode()
        // The unused u32 after a v1 size is not part of it.
        LittleEndian.put(UInt32(7), &b, 40)
        #expect(try ImageHeader.decode(b).sizeInSectors == 2_097_152)
    }
}

struct CHSTests {
    @Test(arguments: [
        // (sectors, cylinders, heads): mid range uses 16×63; elsewhere the first of 63/32/16/8 × 16/8/4/2 that divides.
        (UInt64(2_097_152), UInt32(2080), UInt32(16)),
        (UInt64(20_971_520), UInt32(40960), UInt32(16)),
        (UInt64(131_072), UInt32(256), UInt32(16)),
        (UInt64(1_032_192), UInt32(1024), UInt32(16)),
        (UInt64(3), UInt32(3), UInt32(1)),
        (UInt64(16_777_216), UInt32(32768), UInt32(16)),
    ])
    func geometry(_ sectors: UInt64, _ cylinders: UInt32, _ heads: UInt32) {
        let g = CHSGeometry(sectors: sectors)
        #expect(g.cylinders == cylinders)
        #expect(g.heads == heads)
    }
}

struct SizeArgumentTests {
    @Test(arguments: [
        ("512", UInt64(512)), ("2048", 2048), ("1k", 2), ("64k", 128), ("64K", 128), ("1m", 2048),
        ("1g", 2_097_152), ("10G", 20_971_520), ("2T", 4_294_967_296), ("1024b", 2), (" 1g ", 2_097_152),
    ])
    func parses(_ text: String, _ sectors: UInt64) throws {
        #expect(try SizeArgument.sectors(text) == sectors)
    }

    @Test func errors() throws {
        #expect(throws: SizeArgument.ParseError.empty) { try SizeArgument.sectors("") }
        #expect(throws: SizeArgument.ParseError.zero("0")) { try SizeArgument.sectors("0") }
        #expect(throws: SizeArgument.ParseError.zero("0g")) { try SizeArgument.sectors("0g") }
        #expect(throws: SizeArgument.ParseError.negative("-1g")) { try SizeArgument.sectors("-1g") }
        let limit = PloopSpec.maxImageSectors
        #expect(throws: SizeArgument.ParseError.tooLarge("99999999999999999999", limitSectors: limit)) { try SizeArgument.sectors("99999999999999999999") }
        #expect(throws: SizeArgument.ParseError.tooLarge("99999999999t", limitSectors: limit)) { try SizeArgument.sectors("99999999999t") }
        // Sizes that trapped the tool (issue 12): 2^54 and 2^55 sectors, past off_t once in bytes.
        for text in ["18014398509481984", "36028797018963968", "51t", "\(limit + 1)"] {
            #expect(throws: SizeArgument.ParseError.tooLarge(text, limitSectors: limit)) { try SizeArgument.sectors(text) }
        }
        #expect(try SizeArgument.sectors("50t") == limit)
        #expect(throws: SizeArgument.ParseError.notSectorMultiple("1000b", bytes: 1000)) { try SizeArgument.sectors("1000b") }
        #expect(throws: SizeArgument.ParseError.unknownSuffix("1x")) { try SizeArgument.sectors("1x") }
        #expect(throws: SizeArgument.ParseError.notANumber("abc")) { try SizeArgument.sectors("abc") }
        #expect(throws: SizeArgument.ParseError.notANumber("1.5")) { try SizeArgument.sectors("1.5") }
    }

    @Test func describes() {
        #expect(SizeArgument.describe(bytes: 1 << 30) == "1 GiB")
        #expect(SizeArgument.describe(bytes: 768 << 10) == "768 KiB")
        #expect(SizeArgument.describe(bytes: 0) == "0 B")
    }
}
