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
        // The header, and the BAT streamed to count what it maps: `info` on a huge image costs
        // a window of the BAT, not the whole of it in memory.
        let headerBytes = try file.readBytes(PloopSpec.headerSize, at: 0)
        let h: ImageHeader
        do { h = try ImageHeader.decode(headerBytes) } catch { throw .format(path, error) }
        let batEnd = UInt64(h.firstBlockOffset) * PloopSpec.sectorSize
        guard size >= batEnd else { throw .truncated(path, size: size, needed: batEnd) }
        var allocated = 0
        try BATScan.forEachNonZero(file, count: Int(h.batEntries)) { _, _ in allocated += 1 }
        var flags: [String] = []
        if h.flags.contains(.empty) { flags.append("empty") }
        if h.flags.contains(.versionConvert) { flags.append("version-convert") }
        return ImageInfo(
            path: path, format: .ploop1, version: h.version.rawValue, virtualSize: h.virtualBytes,
            clusterSize: h.clusterBytes, batEntries: h.batEntries, allocatedClusters: allocated,
            inUse: h.inUse, flags: flags, fileSize: size,
            firstDataOffset: UInt64(h.firstBlockOffset) * PloopSpec.sectorSize, heads: h.heads, cylinders: h.cylinders)
    }
}
