import PloopFormat
import PloopImage

/// One image of a mount request, opened and checked.
public struct ProbedImage: Sendable {
    public let path: String
    public let file: any BlockFile
    public let format: ImageFormat
    /// The ploop1 header (nil for a raw base).
    public let header: ImageHeader?
}

extension MountRequest {
    /// The checks made before a stack is started, by the model and by the kernel backend alike
    /// (the original runs the same ones before handing images to the kernel): there are images,
    /// the cluster size asked for is valid, every file opens, a raw base is not a ploop1 image and
    /// every other level is one, no image is marked in use, every cluster size agrees (with the
    /// one asked for too). `oneVersion` also requires one header version (the kernel stacks one).
    /// `open(path, writable)` opens (and locks, where the caller locks) each file. Returns the
    /// images base first and the cluster size in sectors.
    /// `allowInUse` accepts images marked in use (dm-ploop: user space marks the top itself).
    public func probe(oneVersion: Bool, allowInUse: Bool = false, open: (String, Bool) throws(ImageError) -> any BlockFile) throws(DeviceError) -> (images: [ProbedImage], clusterSectors: UInt32) {
        guard !images.isEmpty else { throw .noImages }
        if let c = clusterSectors, !BATLayout.isValidClusterSize(c) { throw .invalidClusterSize(sectors: c) }
        var cluster = clusterSectors
        var version: FormatVersion?
        var out: [ProbedImage] = []
        for (i, path) in images.enumerated() {
            let writable = i == images.count - 1 && !readOnly
            let file = try lifting { () throws(ImageError) in try open(path, writable) }
            let detected = try lifting { () throws(ImageError) in try ImagePath.detectFormat(file) }
            if i == 0 && baseFormat == .raw {
                if detected == .ploop1 { throw .image(.looksLikePloop1(path)) }
                out.append(ProbedImage(path: path, file: file, format: .raw, header: nil))
                continue
            }
            guard detected == .ploop1 else { throw .image(.notPloop1(path)) }
            let header = try lifting { () throws(ImageError) in try Ploop1Image(file: file, writable: false).header }
            if header.inUse && !allowInUse { throw .image(.inUse(path)) }
            if let c = cluster, c != header.clusterSectors {
                throw .image(.clusterSizeMismatch(path, clusterBytes: header.clusterBytes, expected: Int(c) * 512))
            }
            if oneVersion, let v = version, v != header.version {
                throw .invalid("\(path) is a \(header.version) image but the levels below are \(v): the kernel stacks one version only (convert with 'ploop convert')")
            }
            cluster = header.clusterSectors
            version = header.version
            out.append(ProbedImage(path: path, file: file, format: .ploop1, header: header))
        }
        return (out, cluster ?? PloopSpec.defaultClusterSectors)
    }
}
