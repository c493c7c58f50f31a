/// The 64-byte ploop1 header (`struct ploop_pvd_header`), all fields little-endian.
///
/// ```
///  off size field                    meaning
///    0  16  m_Sig                    "WithoutFreeSpace" (v1) | "WithouFreSpacExt" (v2), no NUL
///   16   4  m_Type                   2 (PRL_IMAGE_COMPRESSED)
///   20   4  m_Heads                  CHS heads (cosmetic)
///   24   4  m_Cylinders              CHS cylinders (cosmetic)
///   28   4  m_Sectors                cluster size in 512-byte sectors
///   32   4  m_Size                   BAT entries = clusters of the virtual disk
///   36   8  m_SizeInSectors          v2: u64; v1: u32 at 36 + unused u32 at 40
///   44   4  m_DiskInUse              0x746F6E59 "Ynot" while open read-write, else clean
///   48   4  m_FirstBlockOffset       first data cluster, in sectors (header + BAT, cluster aligned)
///   52   4  m_Flags                  CIF_Empty 0x1, CIF_FmtVersionConvert 0x2
///   56   8  m_FormatExtensionOffset  optional extension block, in sectors (0 = none)
///   64 ...  BAT                      u32 per cluster: v1 sector offset, v2 cluster offset, 0 = hole
/// ```
public struct ImageHeader: Equatable, Sendable {
    enum Offset {
        static let signature = 0
        static let type = 16
        static let heads = 20
        static let cylinders = 24
        static let clusterSectors = 28
        static let batEntries = 32
        static let sizeInSectors = 36
        static let diskInUse = 44
        static let firstBlockOffset = 48
        static let flags = 52
        static let formatExtensionOffset = 56
    }

    public var version: FormatVersion
    public var type: UInt32 = PloopSpec.imageTypeCompressed
    public var heads: UInt32
    public var cylinders: UInt32
    /// `m_Sectors`: the cluster size in sectors.
    public var clusterSectors: UInt32
    /// `m_Size`: number of BAT entries.
    public var batEntries: UInt32
    /// Virtual disk size in sectors.
    public var sizeInSectors: UInt64
    /// Raw `m_DiskInUse`; see `inUse`.
    public var diskInUse: UInt32 = 0
    /// `m_FirstBlockOffset`, in sectors.
    public var firstBlockOffset: UInt32
    public var flags: ImageFlags
    /// `m_FormatExtensionOffset`, in sectors.
    public var formatExtensionOffset: UInt64 = 0

    /// True while the image is open read-write (or was, and its writer died).
    public var inUse: Bool {
        get { diskInUse == PloopSpec.diskInUse }
        set { diskInUse = newValue ? PloopSpec.diskInUse : 0 }
    }

    public var clusterBytes: Int { Int(clusterSectors) * Int(PloopSpec.sectorSize) }
    public var virtualBytes: UInt64 { sizeInSectors * PloopSpec.sectorSize }
    public var layout: BATLayout { BATLayout(clusterSectors: clusterSectors, entries: batEntries, version: version) }

    /// The header the original's `generate_pvd_header` writes for a new image: size rounded up to a
    /// whole cluster, CHS from the size, then `m_Sectors` replaced by the cluster size, BAT padded to
    /// whole clusters, `CIF_Empty` set.
    public static func new(sizeSectors: UInt64, clusterSectors: UInt32, version: FormatVersion) throws(FormatError) -> ImageHeader {
        guard BATLayout.isValidClusterSize(clusterSectors) else { throw .invalidClusterSize(sectors: clusterSectors) }
        guard sizeSectors > 0 else { throw .sizeZero }
        let cs = UInt64(clusterSectors)
        let (rounded, overflow) = (sizeSectors / cs).multipliedReportingOverflow(by: cs)
        let size = overflow ? UInt64.max : (rounded == sizeSectors ? rounded : rounded &+ cs)
        let limit = version.maxSizeSectors(clusterSectors: clusterSectors)
        guard size <= limit, size >= sizeSectors else { throw .sizeTooLarge(sectors: sizeSectors, limit: limit, version: version) }
        guard size <= PloopSpec.maxImageSectors else {
            throw .sizeTooLarge(sectors: sizeSectors, limit: PloopSpec.maxImageSectors, version: nil)
        }
        let chs = CHSGeometry(sectors: size)
        let entries = UInt32(size / cs)
        let layout = BATLayout(clusterSectors: clusterSectors, entries: entries, version: version)
        return ImageHeader(
            version: version, heads: chs.heads, cylinders: chs.cylinders, clusterSectors: clusterSectors,
            batEntries: entries, sizeInSectors: size, firstBlockOffset: layout.firstBlockOffsetSectors,
            flags: .empty)
    }

    public init(
        version: FormatVersion, heads: UInt32, cylinders: UInt32, clusterSectors: UInt32, batEntries: UInt32,
        sizeInSectors: UInt64, diskInUse: UInt32 = 0, firstBlockOffset: UInt32, flags: ImageFlags,
        formatExtensionOffset: UInt64 = 0
    ) {
        self.version = version
        self.heads = heads
        self.cylinders = cylinders
        self.clusterSectors = clusterSectors
        self.batEntries = batEntries
        self.sizeInSectors = sizeInSectors
        self.diskInUse = diskInUse
        self.firstBlockOffset = firstBlockOffset
        self.flags = flags
        self.formatExtensionOffset = formatExtensionOffset
    }

    /// The 64 header bytes, written field by field.
    public func encode() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: PloopSpec.headerSize)
        for (i, c) in version.signature.utf8.enumerated() { b[Offset.signature + i] = c }
        LittleEndian.put(type, &b, Offset.type)
        LittleEndian.put(heads, &b, Offset.heads)
        LittleEndian.put(cylinders, &b, Offset.cylinders)
        LittleEndian.put(clusterSectors, &b, Offset.clusterSectors)
        LittleEndian.put(batEntries, &b, Offset.batEntries)
        switch version {
        case .v1:
            LittleEndian.put(UInt32(truncatingIfNeeded: sizeInSectors), &b, Offset.sizeInSectors)
        case .v2:
            LittleEndian.put(sizeInSectors, &b, Offset.sizeInSectors)
        }
        LittleEndian.put(diskInUse, &b, Offset.diskInUse)
        LittleEndian.put(firstBlockOffset, &b, Offset.firstBlockOffset)
        LittleEndian.put(flags.rawValue, &b, Offset.flags)
        LittleEndian.put(formatExtensionOffset, &b, Offset.formatExtensionOffset)
        return b
    }

    /// Decodes and validates the first 64 bytes of an image. Throws the first thing that is wrong,
    /// in the order the original checker tests them (signature, type, cluster size, first block
    /// offset), then the size fields.
    public static func decode(_ bytes: [UInt8]) throws(FormatError) -> ImageHeader {
        guard bytes.count >= PloopSpec.headerSize else { throw .truncatedHeader(length: bytes.count) }
        let sig = bytes[0..<16]
        let version: FormatVersion
        if sig.elementsEqual(FormatVersion.v1.signature.utf8) {
            version = .v1
        } else if sig.elementsEqual(FormatVersion.v2.signature.utf8) {
            version = .v2
        } else {
            let printable = sig.map { (32..<127).contains($0) ? Character(UnicodeScalar($0)) : "." }
            throw .badSignature(found: String(printable))
        }
        let type = LittleEndian.u32(bytes, Offset.type)
        guard type == PloopSpec.imageTypeCompressed else { throw .wrongType(type) }
        let clusterSectors = LittleEndian.u32(bytes, Offset.clusterSectors)
        guard BATLayout.isValidClusterSize(clusterSectors) else { throw .invalidClusterSize(sectors: clusterSectors) }
        let first = LittleEndian.u32(bytes, Offset.firstBlockOffset)
        guard first != 0, first % clusterSectors == 0 else {
            throw .badFirstBlockOffset(sectors: first, clusterSectors: clusterSectors)
        }
        let entries = LittleEndian.u32(bytes, Offset.batEntries)
        let size: UInt64 = switch version {
        case .v1: UInt64(LittleEndian.u32(bytes, Offset.sizeInSectors))
        case .v2: LittleEndian.u64(bytes, Offset.sizeInSectors)
        }
        guard size > 0 else { throw .sizeZero }
        guard size <= UInt64(entries) * UInt64(clusterSectors) else {
            throw .sizeBeyondBAT(sizeSectors: size, entries: entries, clusterSectors: clusterSectors)
        }
        let needed = (size + UInt64(clusterSectors) - 1) / UInt64(clusterSectors)
        guard UInt64(entries) == needed else { throw .batEntriesMismatch(entries: entries, expected: needed) }
        let layout = BATLayout(clusterSectors: clusterSectors, entries: entries, version: version)
        guard UInt64(first) >= UInt64(layout.firstBlockOffsetSectors) else {
            throw .batDoesNotFit(entries: entries, firstBlockOffset: first)
        }
        let flags = LittleEndian.u32(bytes, Offset.flags)
        guard flags & ~ImageFlags.known.rawValue == 0 else { throw .unknownFlags(flags) }
        return ImageHeader(
            version: version,
            heads: LittleEndian.u32(bytes, Offset.heads),
            cylinders: LittleEndian.u32(bytes, Offset.cylinders),
            clusterSectors: clusterSectors,
            batEntries: entries,
            sizeInSectors: size,
            diskInUse: LittleEndian.u32(bytes, Offset.diskInUse),
            firstBlockOffset: first,
            flags: ImageFlags(rawValue: flags),
            formatExtensionOffset: LittleEndian.u64(bytes, Offset.formatExtensionOffset))
    }

    /// True if the bytes begin with either ploop1 signature (used to tell raw files from ploop1).
    public static func hasSignature(_ bytes: [UInt8]) -> Bool {
        guard bytes.count >= 16 else { return false }
        return FormatVersion.allCases.contains { bytes[0..<16].elementsEqual($0.signature.utf8) }
    }

    /// Byte offset of the `m_DiskInUse` field, for writers that flip only the mark.
    public static let diskInUseOffset = Offset.diskInUse
}
