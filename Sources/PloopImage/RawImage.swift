import PloopFormat

/// A raw base delta: byte N of the device is byte N of the file.
public final class RawImage: Sendable {
    public let file: any BlockFile
    public let clusterBytes: Int

    public init(file: any BlockFile, clusterBytes: Int) {
        self.file = file
        self.clusterBytes = clusterBytes
    }

    public var path: String { file.path }
    public func virtualBytes() throws(ImageError) -> UInt64 {
        let s = try file.size()
        return (s + PloopSpec.sectorSize - 1) / PloopSpec.sectorSize * PloopSpec.sectorSize
    }

    /// Reads a whole cluster; bytes past the end of the file read as zeros.
    public func read(cluster: ClusterIndex, into buffer: UnsafeMutableRawBufferPointer) throws(ImageError) {
        let n = try file.read(into: buffer, at: cluster.value * UInt64(clusterBytes))
        if n < buffer.count { buffer[n...].initializeMemory(as: UInt8.self, repeating: 0) }
    }

    public func write(cluster: ClusterIndex, data: UnsafeRawBufferPointer) throws(ImageError) {
        try file.write(data, at: cluster.value * UInt64(clusterBytes))
    }

    /// Creates a raw image of `bytes` (sparse: the file system gives zeros).
    public static func create(on file: any BlockFile, bytes: UInt64) throws(ImageError) {
        try file.truncate(to: bytes)
        try file.sync()
    }
}
