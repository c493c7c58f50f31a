import PloopFormat
import PloopSystem

extension Offline {
    /// Where a version conversion keeps the image's new header and BAT until they are in place.
    public static func conversionFile(of path: String) -> String { path + ".convert" }

    /// `ploop convert -v 1|2` of one image, crash-safe:
    ///
    /// 1. the new header and BAT (entries in the new version's units) are built in
    ///    `IMAGE.convert.tmp`, synced, renamed to `IMAGE.convert`: the image is untouched so far;
    /// 2. the image's header gets the in-use mark and `CIF_FmtVersionConvert` (synced): from here
    ///    the image is "busy" (`check` exits 17) until the conversion is finished;
    /// 3. the new BAT is copied over the old one, synced; the new header written, synced;
    /// 4. `IMAGE.convert` is removed.
    ///
    /// Killed after step 2, `finishVersionConversion` (run by `convert` again, or by `check`) does
    /// steps 3 and 4 from `IMAGE.convert`. A v1 header counts sectors in 32 bits: a size or a block
    /// it cannot hold is refused before anything is written (the original wraps them).
    /// Returns false when the image already had that version.
    @discardableResult
    public static func convertVersion(path: String, to version: FormatVersion) throws(ImageError) -> Bool {
        let file = try ImagePath.open(path, write: true)
        try ImagePath.lock(file, exclusive: true)
        guard try ImagePath.detectFormat(file) == .ploop1 else { throw .notPloop1(path) }
        let staged = conversionFile(of: path)
        let probeHeader = try readHeader(file, path)
        if probeHeader.inUse && probeHeader.flags.contains(.versionConvert) {
            try finishVersionConversion(file)
            return true
        }
        // A staged BAT beside an image that is not being converted is a leftover.
        PathInfo.removeRegularFile(staged)
        let image = try Ploop1Image(file: file, writable: false)
        let old = image.header
        if old.inUse { throw .inUse(path) }
        try Checker.validate(file)
        guard old.version != version else { return false }
        if version == .v1 {
            let limit = version.maxSizeSectors(clusterSectors: old.clusterSectors)
            guard old.sizeInSectors <= limit else {
                throw .format(path, .sizeTooLarge(sectors: old.sizeInSectors, limit: limit, version: .v1))
            }
        }
        var new = old
        new.version = version
        let newLayout = BATLayout(clusterSectors: old.clusterSectors, entries: old.batEntries, version: version)
        // 1: the new header and BAT beside the image.
        let tmp = staged + ".tmp"
        PathInfo.removeRegularFile(tmp)
        let out = try PosixBlockFile(path: tmp, mode: .createNew)
        do throws(ImageError) {
            try out.writeBytes(new.encode(), at: 0)
            try out.truncate(to: UInt64(PloopSpec.headerSize) + 4 * UInt64(old.batEntries))
            var failure: ImageError?
            for (c, b) in image.allocatedClusters() {
                guard newLayout.canEncode(b) else {
                    failure = .fileTooLarge(path, block: b.value)
                    break
                }
                try out.writeBytes(Checker.le32(newLayout.encode(b)), at: old.layout.entryOffset(c))
            }
            if let failure { throw failure }
            try out.sync()
            do { try PathInfo.publish(tmp, as: staged, replace: false) } catch { throw ImageError.from(error, staged) }
        } catch {
            PathInfo.removeRegularFile(tmp)
            throw error
        }
        // 2: the image says it is being converted.
        var busy = old
        busy.inUse = true
        busy.flags.insert(.versionConvert)
        try file.writeBytes(busy.encode(), at: 0)
        try file.sync()
        // 3 and 4.
        try finishVersionConversion(file)
        return true
    }

    /// The staged BAT of a finished conversion that could not be removed (an I/O error at step
    /// 4), if one is there; harmless, and dropped by the next conversion or disk command.
    public static func leftoverConversionFile(of path: String) -> String? {
        let staged = conversionFile(of: path)
        return PathInfo.kind(staged) == .regular ? staged : nil
    }

    /// Steps 3 and 4 of `convertVersion` for an image whose header says a conversion is under way.
    public static func finishVersionConversion(_ file: any BlockFile) throws(ImageError) {
        let path = file.path
        let staged = conversionFile(of: path)
        guard PathInfo.kind(staged) == .regular else {
            throw .corrupt(path, "a v1/v2 conversion was interrupted and its staged BAT (\(staged)) is gone; restore the image from a backup")
        }
        let source = try PosixBlockFile(path: staged, mode: .readOnly)
        let header = try readHeader(source, staged)
        let batBytes = UInt64(PloopSpec.headerSize) + 4 * UInt64(header.batEntries)
        guard try source.size() == batBytes else { throw .corrupt(staged, "its size is not a header and a BAT of \(header.batEntries) entries") }
        var window = [UInt8](repeating: 0, count: 1 << 20)
        var at = UInt64(PloopSpec.headerSize)
        while at < batBytes {
            let n = Int(min(UInt64(window.count), batBytes - at))
            let got = try rethrowingImageError { try window.withUnsafeMutableBytes { try source.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: at) } }
            guard got == n else { throw .corrupt(staged, "it ends early") }
            try rethrowingImageError { try window.withUnsafeBytes { try file.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: at) } }
            at += UInt64(n)
        }
        try file.sync()
        var final = header
        final.inUse = false
        final.flags.remove(.versionConvert)
        try file.writeBytes(final.encode(), at: 0)
        try file.sync()
        PathInfo.removeRegularFile(staged)
        PathInfo.syncParentDirectory(of: staged)
    }
}

/// The header of `file`, decoded and validated.
func readHeader(_ file: any BlockFile, _ path: String) throws(ImageError) -> ImageHeader {
    let bytes = try file.readBytes(PloopSpec.headerSize, at: 0)
    do { return try ImageHeader.decode(bytes) } catch { throw .format(path, error) }
}
