import PloopFormat

/// What `ploop info` prints.
public struct ImageInfo: Sendable, Codable, Equatable {
    public var path: String
    public var format: ImageFormat
    public var version: Int?
    public var virtualSize: UInt64
    public var clusterSize: Int?
    public var batEntries: UInt32?
    public var allocatedClusters: Int?
    public var inUse: Bool
    public var flags: [String]
    public var fileSize: UInt64
    public var firstDataOffset: UInt64?
    public var heads: UInt32?
    public var cylinders: UInt32?

    /// Reads an image without locking or changing it.
    public static func read(path: String) throws(ImageError) -> ImageInfo {
        let file = try ImagePath.open(path, write: false)
        let size = try file.size()
        guard size > 0 else { throw .empty(path) }
        guard try ImagePath.detectFormat(file) == .ploop1 else {
            return ImageInfo(path: path, format: .raw, virtualSize: size, inUse: false, flags: [], fileSize: size)
        }
        let image = try Ploop1Image(file: file, writable: false)
        let h = image.header
        var flags: [String] = []
        if h.flags.contains(.empty) { flags.append("empty") }
        if h.flags.contains(.versionConvert) { flags.append("version-convert") }
        return ImageInfo(
            path: path, format: .ploop1, version: h.version.rawValue, virtualSize: h.virtualBytes,
            clusterSize: h.clusterBytes, batEntries: h.batEntries, allocatedClusters: image.allocatedCount,
            inUse: h.inUse, flags: flags, fileSize: size,
            firstDataOffset: UInt64(h.firstBlockOffset) * PloopSpec.sectorSize, heads: h.heads, cylinders: h.cylinders)
    }
}
