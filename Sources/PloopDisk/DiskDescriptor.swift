import Foundation
import PloopFormat

/// DiskDescriptor.xml, element by element (the original's lib/xml.c layout, v7):
///
/// ```
/// Parallels_disk_image
///   Disk_Parameters: Disk_size, [Max_delta_size], Cylinders, Heads, Sectors, Padding, [Encryption/KeyId]
///   StorageData
///     [Volume: Parent, SnapshotGUID, [ReadOnly]]
///     Storage (exactly one): Start, End, Blocksize, [Preallocated],
///       Image* (base first): GUID, Type (Compressed | Plain), File (relative to the folder)
///   Snapshots: TopGUID, Shot* (base first): GUID, ParentGUID, [Temporary]
/// ```
///
/// Sizes are 512-byte sectors. Images form a tree by ParentGUID (the base's parent is the zero
/// GUID); the disk is the chain from TopGUID down to the base.
public struct DiskDescriptor: Equatable, Sendable {
    public struct Image: Equatable, Sendable {
        public enum Kind: String, Sendable { case compressed = "Compressed", plain = "Plain" }
        public var guid: GUID
        public var kind: Kind
        /// As written in the descriptor (relative to its folder, or absolute).
        public var file: String
        public init(guid: GUID, kind: Kind, file: String) {
            self.guid = guid
            self.kind = kind
            self.file = file
        }
    }

    public struct Shot: Equatable, Sendable {
        public var guid: GUID
        public var parent: GUID
        public var temporary: Bool
        public init(guid: GUID, parent: GUID, temporary: Bool = false) {
            self.guid = guid
            self.parent = parent
            self.temporary = temporary
        }
    }

    public struct Volume: Equatable, Sendable {
        public var parent: String
        public var snapshotGUID: String
        public var readOnly: String?
    }

    public var diskSizeSectors: UInt64
    public var maxDeltaSizeSectors: UInt64?
    public var cylinders: UInt32
    public var heads: UInt32
    public var sectors: UInt32
    public var encryptionKeyId: String?
    public var volume: Volume?
    public var blocksize: UInt32
    public var preallocated: Bool
    public var images: [Image]
    public var topGUID: GUID
    public var shots: [Shot]

    public init(
        diskSizeSectors: UInt64, cylinders: UInt32, heads: UInt32, blocksize: UInt32, images: [Image], topGUID: GUID,
        shots: [Shot], preallocated: Bool = false
    ) {
        self.diskSizeSectors = diskSizeSectors
        self.cylinders = cylinders
        self.heads = heads
        self.sectors = Self.sectors(size: diskSizeSectors, cylinders: cylinders, heads: heads)
        self.blocksize = blocksize
        self.preallocated = preallocated
        self.images = images
        self.topGUID = topGUID
        self.shots = shots
    }

    /// `Sectors` as the original computes it: Disk_size / (Cylinders × Heads), 0 if either is 0.
    public static func sectors(size: UInt64, cylinders: UInt32, heads: UInt32) -> UInt32 {
        guard cylinders > 0, heads > 0 else { return 0 }
        return UInt32(clamping: size / (UInt64(cylinders) * UInt64(heads)))
    }

    /// A descriptor for one base image (what `init` and `restore-descriptor` write).
    public static func single(file: String, kind: Image.Kind, sizeSectors: UInt64, blocksize: UInt32, cylinders: UInt32, heads: UInt32, preallocated: Bool = false) -> DiskDescriptor {
        DiskDescriptor(
            diskSizeSectors: sizeSectors, cylinders: cylinders, heads: heads, blocksize: blocksize,
            images: [Image(guid: .top, kind: kind, file: file)], topGUID: .top, shots: [Shot(guid: .top, parent: .none)],
            preallocated: preallocated)
    }

    // MARK: - The tree

    public func image(_ g: GUID) -> Image? { images.first { $0.guid == g } }
    public func shot(_ g: GUID) -> Shot? { shots.first { $0.guid == g } }
    public func children(of g: GUID) -> [GUID] { shots.filter { $0.parent == g }.map(\.guid) }

    /// The chain from `from` (default: the top) down to the base: top first.
    public func chain(from: GUID? = nil) -> [GUID] {
        var out: [GUID] = []
        var g = from ?? topGUID
        while !g.isNone, let s = shot(g), !out.contains(g) {
            out.append(g)
            g = s.parent
        }
        return out
    }

    public var base: GUID? { chain().last }

    mutating func rename(_ old: GUID, to new: GUID) {
        for i in images.indices where images[i].guid == old { images[i].guid = new }
        for i in shots.indices {
            if shots[i].guid == old { shots[i].guid = new }
            if shots[i].parent == old { shots[i].parent = new }
        }
        if topGUID == old { topGUID = new }
    }

    mutating func remove(_ g: GUID) {
        images.removeAll { $0.guid == g }
        shots.removeAll { $0.guid == g }
    }
}
