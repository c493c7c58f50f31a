/// Where the BAT lives and how its entries translate to file blocks.
///
/// The BAT is one flat u32 array starting at byte 64; the entry of virtual cluster `c` is at byte
/// `64 + 4c`. Header and BAT are padded to whole clusters; data starts at `firstBlockOffset`.
public struct BATLayout: Equatable, Sendable {
    public let clusterSectors: UInt32
    public let entries: UInt32
    public let version: FormatVersion

    public init(clusterSectors: UInt32, entries: UInt32, version: FormatVersion) {
        self.clusterSectors = clusterSectors
        self.entries = entries
        self.version = version
    }

    public static func isValidClusterSize(_ sectors: UInt32) -> Bool {
        sectors >= PloopSpec.minClusterSectors && sectors <= PloopSpec.maxClusterSectors && sectors & (sectors - 1) == 0
    }

    public var clusterBytes: Int { Int(clusterSectors) * Int(PloopSpec.sectorSize) }
    /// u32 slots per BAT cluster (the first one gives 16 of them to the header).
    public var entriesPerCluster: Int { clusterBytes / 4 }
    /// Header + BAT bytes before padding.
    public var batBytes: UInt64 { UInt64(PloopSpec.headerSize) + 4 * UInt64(entries) }
    /// Clusters taken by header + BAT ("l1_size").
    public var batClusters: UInt32 {
        let sectorAligned = (batBytes + PloopSpec.sectorSize - 1) / PloopSpec.sectorSize * PloopSpec.sectorSize
        return UInt32((sectorAligned + UInt64(clusterBytes) - 1) / UInt64(clusterBytes))
    }
    public var firstBlockOffsetSectors: UInt32 { batClusters * clusterSectors }
    /// File offset of the first data cluster.
    public var firstDataOffset: UInt64 { UInt64(batClusters) * UInt64(clusterBytes) }
    /// Byte offset of a cluster's BAT entry in the file.
    public func entryOffset(_ cluster: ClusterIndex) -> UInt64 { UInt64(PloopSpec.headerSize) + 4 * cluster.value }
    /// The largest virtual size one BAT cluster count can map, in entries.
    public static func entriesFitting(batClusters: UInt32, clusterSectors: UInt32) -> UInt64 {
        UInt64(batClusters) * UInt64(clusterSectors) * PloopSpec.sectorSize / 4 - UInt64(PloopSpec.mapOffset)
    }

    /// The on-disk value pointing at `block`: sectors (v1) or clusters (v2).
    public func encode(_ block: ImageBlock) -> UInt32 {
        switch version {
        case .v1: block.value * clusterSectors
        case .v2: block.value
        }
    }

    /// Whether a block can be written as a BAT entry in this version (v1 counts sectors in 32 bits).
    public func canEncode(_ block: ImageBlock) -> Bool {
        switch version {
        case .v1: UInt64(block.value) * UInt64(clusterSectors) <= UInt64(UInt32.max)
        case .v2: true
        }
    }

    /// The block a non-zero entry points at; v1 entries must be cluster aligned.
    public func decode(_ entry: UInt32) throws(FormatError) -> ImageBlock {
        switch version {
        case .v1:
            guard entry % clusterSectors == 0 else { throw .v1EntryMisaligned(entry: entry, clusterSectors: clusterSectors) }
            return ImageBlock(entry / clusterSectors)
        case .v2:
            return ImageBlock(entry)
        }
    }
}
