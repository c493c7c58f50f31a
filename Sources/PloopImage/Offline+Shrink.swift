import PloopFormat

extension Ploop1Image {
    /// Shrinks the virtual size, for a disk whose file system was made smaller first: the
    /// clusters past the new end are dropped from the BAT (synced), the blocks still in use past
    /// the new file end are moved into the holes below it, each copied and synced before its
    /// entry is repointed and synced, the file is cut after the last block in use, and the
    /// header, written last, switches to the new size and to the BAT area that size needs (as
    /// every image is laid out: dm-ploop refuses any other first-block offset). Blocks move only
    /// into holes past the old BAT area, so the BAT clusters the new header gives up, zero since
    /// their entries were dropped, are holes from then on. Interrupted anywhere, the image checks
    /// clean and keeps every cluster below the new end.
    public func shrink(toSectors requested: UInt64, progress: ((Int, Int) -> Void)? = nil) throws(ImageError) {
        guard writable else { throw .readOnly(path) }
        let old = header
        var new: ImageHeader
        do { new = try ImageHeader.new(sizeSectors: requested, clusterSectors: old.clusterSectors, version: old.version) } catch { throw .format(path, error) }
        guard new.sizeInSectors < old.sizeInSectors else { return }
        new.diskInUse = old.diskInUse
        new.flags = old.flags
        try flush()
        let keep = Int(new.batEntries)
        for (c, _) in allocatedClusters() where Int(c.value) >= keep { try setEntry(c, to: nil) }
        try file.sync()
        // Compaction: the blocks in use past the end they would fit in move into the holes.
        let first = firstDataBlock
        let owners = owners()
        let end = first + UInt32(owners.count)
        let holes = (first..<end).filter { owners[$0] == nil }
        let moving = owners.keys.filter { $0 >= end }.sorted()
        let cb = UInt64(clusterBytes)
        var scratch = [UInt8](repeating: 0, count: clusterBytes)
        for (i, (from, to)) in zip(moving, holes).enumerated() {
            try rethrowingImageError {
                try scratch.withUnsafeMutableBytes { s in
                    try file.copy(from: file, at: UInt64(from) * cb, to: UInt64(to) * cb, length: clusterBytes, scratch: s)
                }
            }
            try file.sync()
            try setEntry(owners[from]!, to: ImageBlock(to))
            try file.sync()
            progress?(i + 1, moving.count)
        }
        try truncate(toBlocks: max(end, first))
        try replaceHeader(new)
        try file.sync()
    }
}

extension Offline {
    /// `ploop resize` down, offline, of one image (either format). A raw image is cut.
    public static func shrink(path: String, toSectors sectors: UInt64, format: ImageFormat?, progress: ((Int, Int) -> Void)? = nil) throws(ImageError) {
        let (file, header) = try openForSizeChange(path, format: format)
        if header != nil {
            let image = try Ploop1Image(file: file, writable: true)
            try image.shrink(toSectors: sectors, progress: progress)
            try image.close()
        } else {
            let bytes = sectors * PloopSpec.sectorSize
            guard bytes < (try file.size()) else { return }
            try file.truncate(to: bytes)
            try file.sync()
        }
    }
}
