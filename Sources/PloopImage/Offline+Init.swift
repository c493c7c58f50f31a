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
        /// Every cluster of a ploop1 image given its block before the image is published (`-f preallocated`).
        public var preallocated = false

        public init(path: String, sizeSectors: UInt64, format: ImageFormat = .ploop1, clusterSectors: UInt32 = PloopSpec.defaultClusterSectors, version: FormatVersion = .v2, preallocated: Bool = false) {
            self.path = path
            self.preallocated = preallocated && format == .ploop1
            self.sizeSectors = sizeSectors
            self.format = format
            self.clusterSectors = clusterSectors
            self.version = version
        }
    }

    /// Creates a new image. Everything is validated before anything is created. The image is
    /// built under a temporary name beside it (`IMAGE.init-PID`, see `TemporaryFile`) and renamed
    /// into place, never over an existing file, only once it is complete and synced: an
    /// interrupted `init` leaves no half-made image under the name asked for.
    @discardableResult
    public static func initialize(_ r: InitRequest) throws(ImageError) -> ImageHeader {
        let header: ImageHeader
        do {
            header = try ImageHeader.new(sizeSectors: r.sizeSectors, clusterSectors: r.clusterSectors, version: r.version)
        } catch { throw .format(r.path, error) }
        try ImagePath.checkNew(r.path)
        let temp: TemporaryFile
        do { temp = try TemporaryFile(destination: r.path, suffix: "init", replace: false) } catch { throw .from(error, r.path) }
        let file = PosixBlockFile(temp.file)
        switch r.format {
        case .ploop1:
            try Ploop1Image.create(on: file, header: header)
            if r.preallocated { try preallocate(file) }
        case .raw: try RawImage.create(on: file, bytes: header.virtualBytes)
        }
        do { try temp.publish(replace: false) } catch { throw .from(error, r.path) }
        return header
    }
}
