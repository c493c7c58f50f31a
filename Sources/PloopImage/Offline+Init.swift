import PloopFormat
import PloopSystem

/// Offline operations on image files (no device involved).
public enum Offline {
    /// What `ploop init` makes.
    public struct InitRequest: Sendable {
        public var path: String
        public var sizeSectors: UInt64
        public var format: ImageFormat = .ploop1
        public var clusterSectors: UInt32 = PloopSpec.defaultClusterSectors
        public var version: FormatVersion = .v2

        public init(path: String, sizeSectors: UInt64, format: ImageFormat = .ploop1, clusterSectors: UInt32 = PloopSpec.defaultClusterSectors, version: FormatVersion = .v2) {
            self.path = path
            self.sizeSectors = sizeSectors
            self.format = format
            self.clusterSectors = clusterSectors
            self.version = version
        }
    }

    /// Creates a new image. Everything is validated before the file is created; the file is created
    /// exclusively (an existing file is never touched) and removed again if writing it fails.
    @discardableResult
    public static func initialize(_ r: InitRequest) throws(ImageError) -> ImageHeader {
        let header: ImageHeader
        do {
            header = try ImageHeader.new(sizeSectors: r.sizeSectors, clusterSectors: r.clusterSectors, version: r.version)
        } catch { throw .format(r.path, error) }
        if PathInfo.kind(r.path) != .missing { throw .alreadyExists(r.path) }
        let file = try PosixBlockFile(path: r.path, mode: .createNew)
        do {
            switch r.format {
            case .ploop1: try Ploop1Image.create(on: file, header: header)
            case .raw: try RawImage.create(on: file, bytes: header.virtualBytes)
            }
            PathInfo.syncParentDirectory(of: r.path)
        } catch {
            PathInfo.remove(r.path)
            throw error
        }
        return header
    }
}
