import PloopFormat
@testable import PloopImage

/// Small images in memory: 32 KiB clusters keep the crash matrices quick.
enum Fixture {
    static let cs: UInt32 = 64
    static let cb = Int(cs) * 512

    static func image(clusters: UInt64, version: FormatVersion = .v2, path: String = "<mem>") throws -> MemoryBlockFile {
        let file = MemoryBlockFile(path: path)
        let h = try ImageHeader.new(sizeSectors: clusters * UInt64(cs), clusterSectors: cs, version: version)
        try Ploop1Image.create(on: file, header: h)
        return file
    }

    /// A cluster filled with a pattern that names its cluster and a generation.
    static func pattern(_ cluster: UInt64, _ generation: UInt8) -> [UInt8] {
        var b = [UInt8](repeating: generation, count: cb)
        withUnsafeBytes(of: cluster.littleEndian) { b.replaceSubrange(0..<8, with: $0) }
        b[cb - 1] = UInt8(truncatingIfNeeded: cluster) ^ generation
        return b
    }

    static func write(_ image: Ploop1Image, _ cluster: UInt64, _ data: [UInt8]) throws {
        try data.withUnsafeBytes { try image.write(cluster: ClusterIndex(cluster), data: $0) }
    }

    static func read(_ image: Ploop1Image, _ cluster: UInt64) throws -> [UInt8]? {
        var b = [UInt8](repeating: 0, count: image.clusterBytes)
        let found = try b.withUnsafeMutableBytes { try image.read(cluster: ClusterIndex(cluster), into: $0) }
        return found ? b : nil
    }

    /// Fills clusters with patterns and closes the image; returns the reference content.
    static func populate(_ file: any BlockFile, clusters: [UInt64], generation: UInt8) throws -> [UInt64: [UInt8]] {
        let image = try Ploop1Image(file: file, writable: true)
        var ref: [UInt64: [UInt8]] = [:]
        for c in clusters {
            let p = pattern(c, generation)
            try write(image, c, p)
            ref[c] = p
        }
        try image.close()
        return ref
    }

    /// Two levels to merge: a base (clusters 0, 1, 2, 5) and a top (1, 3, 8999) over it, 9000
    /// clusters each, with the base's content before and after merging the top into it.
    struct MergeStage {
        var base: MemoryBlockFile
        var top: Ploop1Image
        var old: [UInt64: [UInt8]]
        var new: [UInt64: [UInt8]]
        var merged: [UInt64: [UInt8]]
    }

    static func mergeStage() throws -> MergeStage {
        let base = try image(clusters: 9000, path: "base")
        let top = try image(clusters: 9000, path: "top")
        let old = try populate(base, clusters: [0, 1, 2, 5], generation: 1)
        let new = try populate(top, clusters: [1, 3, 8999], generation: 2)
        return MergeStage(base: base, top: try Ploop1Image(file: top, writable: false), old: old, new: new, merged: old.merging(new) { $1 })
    }

    static var forceDrop: Checker.Options {
        var o = Checker.Options()
        o.force = true
        o.dropInUse = true
        return o
    }

    static var forceReadOnly: Checker.Options {
        var o = Checker.Options()
        o.force = true
        o.readOnly = true
        return o
    }
}
