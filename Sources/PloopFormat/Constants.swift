/// Facts of the ploop1 on-disk format and of the original tools that several layers share.
public enum PloopSpec {
    /// Bytes in a sector; every size in the header is counted in these.
    public static let sectorSize: UInt64 = 512
    /// The header occupies the first 64 bytes of the first cluster; the BAT follows it.
    public static let headerSize = 64
    /// `PLOOP_MAP_OFFSET`: BAT slots the header takes in the first BAT cluster (64 / 4).
    public static let mapOffset = 16
    /// `PRL_IMAGE_COMPRESSED`, the only `m_Type` ploop accepts.
    public static let imageTypeCompressed: UInt32 = 2
    /// `SIGNATURE_DISK_IN_USE` ("Ynot" in little-endian bytes).
    public static let diskInUse: UInt32 = 0x746F_6E59
    /// `SIGNATURE_DISK_CLOSED_V21` ("v2.1"), written by copies that carry a CBT extension. Clean.
    public static let diskClosedV21: UInt32 = 0x312E_3276
    /// Default cluster: 1 MiB (`PLOOP1_DEF_CLUSTER_LOG` 11 → 2048 sectors).
    public static let defaultClusterSectors: UInt32 = 2048
    /// Smallest and largest cluster the original accepts (`is_valid_blocksize`), in sectors.
    public static let minClusterSectors: UInt32 = 64
    public static let maxClusterSectors: UInt32 = 131_072
    /// `PLOOP_MAX_FS_SIZE`: the tools cap every image at 50 TiB (an ext4 limit), in sectors.
    public static let maxImageSectors: UInt64 = 50 * 1024 * 1024 * 1024 * 1024 / 512
    /// `BALLOON_FNAME` of the original; the hidden balloon file at the root of the filesystem.
    public static let balloonFileName = ".balloon-c3a5ae3d-ce7f-43c4-a1ea-c61e2b4504e8"
}

/// Header flags (`m_Flags`).
public struct ImageFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `CIF_Empty`: no data cluster has been written.
    public static let empty = ImageFlags(rawValue: 0x1)
    /// `CIF_FmtVersionConvert`: a v1↔v2 conversion is in progress.
    public static let versionConvert = ImageFlags(rawValue: 0x2)
    /// `CIF_FlagsMask`: every bit the format defines.
    public static let known: ImageFlags = [.empty, .versionConvert]
}

/// The two header versions of ploop1.
public enum FormatVersion: Int, Sendable, CaseIterable, Codable, CustomStringConvertible {
    /// "WithoutFreeSpace": 32-bit size in sectors, BAT entries in sectors.
    case v1 = 1
    /// "WithouFreSpacExt": 64-bit size, BAT entries in clusters.
    case v2 = 2

    public var signature: String {
        switch self {
        case .v1: "WithoutFreeSpace"
        case .v2: "WithouFreSpacExt"
        }
    }

    public var description: String { "v\(rawValue)" }

    /// The largest virtual size this version can describe, for a given cluster size, in sectors.
    public func maxSizeSectors(clusterSectors: UInt32) -> UInt64 {
        switch self {
        case .v1: UInt64(UInt32.max) / UInt64(clusterSectors) * UInt64(clusterSectors)
        case .v2: UInt64(UInt32.max) * UInt64(clusterSectors)
        }
    }
}

/// A virtual cluster of the device: the index into the BAT.
public struct ClusterIndex: Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    public var value: UInt64
    public init(_ value: UInt64) { self.value = value }
    public static func < (a: Self, b: Self) -> Bool { a.value < b.value }
    public var description: String { "cluster \(value)" }
}

/// A cluster-sized block of an image file: file offset = block × cluster bytes.
public struct ImageBlock: Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    public var value: UInt32
    public init(_ value: UInt32) { self.value = value }
    public static func < (a: Self, b: Self) -> Bool { a.value < b.value }
    public var description: String { "block \(value)" }
}
