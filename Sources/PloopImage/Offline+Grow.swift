import PloopFormat

extension Ploop1Image {
    /// Grows the virtual size offline, as the original's `grow_delta`: when the BAT needs more
    /// clusters, each data cluster standing where the BAT will grow is copied to the end of the
    /// file, synced, repointed, synced; then the new BAT area is zeroed and synced; the header,
    /// written last, switches to the new size. Interrupted anywhere, the image still checks clean
    /// (at worst with an unreferenced cluster, trimmed by `check`) and keeps every cluster.
    /// `relocated` hears of each move once the new entry is durable and before the old block is
    /// zeroed (a running kernel holding this image read-only must learn it then: UPDATE_INDEX).
    public func grow(
        toSectors requested: UInt64, progress: ((Int, Int) -> Void)? = nil,
        relocated: ((ClusterIndex, ImageBlock) throws(ImageError) -> Void)? = nil
    ) throws(ImageError) {
        guard writable else { throw .readOnly(path) }
        let old = header
        var new: ImageHeader
        do {
            new = try ImageHeader.new(sizeSectors: requested, clusterSectors: old.clusterSectors, version: old.version)
        } catch { throw .format(path, error) }
        guard new.sizeInSectors >= old.sizeInSectors else {
            throw .shrinkRefused(path, currentSectors: old.sizeInSectors, requestedSectors: requested)
        }
        guard new.sizeInSectors > old.sizeInSectors else { return }
        try flush()
        let cb = UInt64(clusterBytes)
        let oldL1 = old.firstBlockOffset / old.clusterSectors
        let newL1 = max(new.layout.batClusters, oldL1)
        new.firstBlockOffset = newL1 * new.clusterSectors
        new.diskInUse = old.diskInUse
        new.flags = old.flags
        let oldBATEnd = UInt64(PloopSpec.headerSize) + 4 * UInt64(old.batEntries)
        if newL1 > oldL1 {
            let head = allocHead
            var dest = max(head, newL1)
            let owners = owners()
            let moving = (oldL1..<min(newL1, head)).filter { owners[$0] != nil }
            var scratch = [UInt8](repeating: 0, count: clusterBytes)
            for (i, blk) in moving.enumerated() {
                let target = ImageBlock(dest)
                guard layout.canEncode(target) else { throw .fileTooLarge(path, block: dest) }
                // Taken before it is written: if a later step fails while the image stays open (a
                // device's online grow), the next allocation must not hand out a block an entry
                // may already point at (at worst it is leaked, and `check` trims it).
                setAllocHead(max(allocHead, dest + 1))
                try rethrowingImageError {
                    try scratch.withUnsafeMutableBytes { s in
                        try file.copy(from: file, at: UInt64(blk) * cb, to: UInt64(dest) * cb, length: clusterBytes, scratch: s)
                    }
                }
                try file.sync()
                try setEntry(owners[blk]!, to: target)
                try file.sync()
                try relocated?(owners[blk]!, target)
                dest += 1
                progress?(i + 1, moving.count)
            }
            setAllocHead(max(allocHead, dest))
            // The new BAT area: old slots past the old size, and the clusters just vacated.
            try file.zeroFill(at: oldBATEnd, count: UInt64(newL1) * cb - oldBATEnd)
        } else {
            try file.zeroFill(at: oldBATEnd, count: UInt64(oldL1) * cb - oldBATEnd)
        }
        try file.sync()
        try replaceHeader(new)
        do { try file.sync() } catch {
            // The new size is not durable: back to the old one in memory and in the file (its
            // page cache), so the image, a device serving it and a disk's descriptor agree on
            // the old size and a re-run grows it again. A failing rollback write still leaves
            // memory old; closing the image writes that header.
            restoreHeader(old)
            throw error
        }
    }
}

extension Offline {
    /// `ploop grow -s SIZE IMAGE` offline, for either format.
    public static func grow(path: String, toSectors sectors: UInt64, format: ImageFormat?, progress: ((Int, Int) -> Void)? = nil) throws(ImageError) {
        guard sectors <= PloopSpec.maxImageSectors else {
            throw .format(path, .sizeTooLarge(sectors: sectors, limit: PloopSpec.maxImageSectors, version: nil))
        }
        let (file, current) = try openForSizeChange(path, format: format)
        if let current {
            do {
                _ = try ImageHeader.new(sizeSectors: sectors, clusterSectors: current.clusterSectors, version: current.version)
            } catch { throw .format(path, error) }
            guard sectors >= current.sizeInSectors else {
                throw .shrinkRefused(path, currentSectors: current.sizeInSectors, requestedSectors: sectors)
            }
            let image = try Ploop1Image(file: file, writable: true)
            try image.grow(toSectors: sectors, progress: progress)
            try image.close()
        } else {
            let size = try file.size()
            let bytes = sectors * PloopSpec.sectorSize
            guard bytes >= size else { throw .shrinkRefused(path, currentSectors: size / PloopSpec.sectorSize, requestedSectors: sectors) }
            guard bytes > size else { return }
            try file.truncate(to: bytes)
            try file.sync()
        }
    }

    /// An image opened and locked for a size change (grow or shrink): a ploop1 image, checked on
    /// a read-only view first (not in use, every entry sound: moving clusters relies on that) so
    /// a refusal leaves it untouched, comes with its header; a raw image (`-f raw` only) without.
    static func openForSizeChange(_ path: String, format: ImageFormat?) throws(ImageError) -> (any BlockFile, ImageHeader?) {
        let file = try ImagePath.open(path, write: true)
        try ImagePath.lock(file, exclusive: true)
        let detected = try ImagePath.detectFormat(file)
        if format == .raw && detected == .ploop1 { throw .looksLikePloop1(path) }
        switch format ?? detected {
        case .ploop1:
            guard detected == .ploop1 else { throw .notPloop1(path) }
            let header = try Ploop1Image(file: file, writable: false).header
            if header.inUse { throw .inUse(path) }
            try Checker.validate(file)
            return (file, header)
        case .raw:
            guard format == .raw else { throw .rawNeedsFormat(path) }
            return (file, nil)
        }
    }
}
