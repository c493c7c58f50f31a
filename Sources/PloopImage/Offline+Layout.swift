import PloopFormat
import PloopSystem

extension Offline {
    /// The image layouts of `ploop init -f` and `ploop convert -f`. `expanded` is a ploop1 image
    /// that grows as clusters are written (the default, also spelt `ploop1`); `preallocated` a
    /// ploop1 image whose every cluster has its block from the start (BAT full, space reserved
    /// with fallocate, reading zeros); `raw` a plain file of the virtual size.
    public enum Layout: String, Sendable, CaseIterable, Codable {
        case raw, expanded, preallocated

        public var format: ImageFormat { self == .raw ? .raw : .ploop1 }

        /// `-f` as the original spells it: raw, ploop1 (= expanded), expanded, preallocated.
        public init?(argument: String) {
            if argument == "ploop1" { self = .expanded } else { self.init(rawValue: argument) }
        }
    }

    /// Gives every cluster of a ploop1 image that has no block one, in cluster order, at the
    /// allocation head: the space is reserved first (one fallocate, synced), then the BAT entries
    /// are written (synced in runs of whole pages), then the header loses `CIF_Empty`. Data never
    /// moves and mapped clusters are not touched, so what the image reads is unchanged. Killed half
    /// way, the image is sound (reserved space past the last entry is a leaked tail `check`
    /// accepts; entries written point at blocks that read zeros) and running it again finishes;
    /// so the in-use mark is not set, and a crash leaves the image clean. The image must not be
    /// in use. Returns the number of clusters given a block.
    @discardableResult
    public static func preallocate(_ file: any BlockFile, progress: (@Sendable (Int, Int) -> Void)? = nil) throws(ImageError) -> Int {
        try Checker.validate(file)
        let image = try Ploop1Image(file: file, writable: true, markInUse: false)
        let clusters = Int(image.header.batEntries)
        let missing = clusters - image.allocatedCount
        guard missing > 0 else {
            try image.close()
            return 0
        }
        let head = image.allocHead
        try file.allocate(at: UInt64(head) * UInt64(image.clusterBytes), length: UInt64(missing) * UInt64(image.clusterBytes))
        try file.sync()
        var given = 0
        for c in 0..<clusters where image.block(of: ClusterIndex(UInt64(c))) == nil {
            let b = try image.reserveBlock()
            image.commit(cluster: ClusterIndex(UInt64(c)), block: b)
            given += 1
            // The header stops saying CIF_Empty before the first entry reaches the file.
            if given == 1 { try image.setInUse(false) }
            // Bounded memory for the pending entries: flush every 64 Ki entries.
            if given % 65536 == 0 {
                try image.flush()
                progress?(given, missing)
            }
        }
        try image.close()
        progress?(given, missing)
        return given
    }

    /// Copies what a ploop1 image reads into `raw` (a file of at least the virtual size, reading
    /// zeros): only mapped clusters that hold something are written, so `raw` stays sparse where
    /// the image has nothing or reads zeros (a preallocated image's untouched blocks).
    /// `raw` is synced before this returns.
    public static func expand(_ image: Ploop1Image, intoRaw raw: any BlockFile, progress: (@Sendable (Int, Int) -> Void)? = nil) throws(ImageError) {
        let cb = image.clusterBytes
        let virtual = image.virtualBytes
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: cb, alignment: 4096)
        defer { buffer.deallocate() }
        let mapped = image.allocatedClusters()
        for (n, (c, b)) in mapped.enumerated() {
            let at = c.value * UInt64(cb)
            let length = Int(min(UInt64(cb), virtual - at))
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])
            try image.read(block: b, offset: 0, into: part)
            if part.contains(where: { $0 != 0 }) { try raw.write(UnsafeRawBufferPointer(part), at: at) }
            if n % 1024 == 1023 { progress?(n + 1, mapped.count) }
        }
        try raw.sync()
        progress?(mapped.count, mapped.count)
    }

    /// Copies a raw image into an empty ploop1 image of the same virtual size: clusters that read
    /// all zeros (holes, or written zeros) get no block. The ploop1 image is flushed and closed
    /// clean before this returns.
    public static func compact(raw: any BlockFile, into image: Ploop1Image, progress: (@Sendable (Int, Int) -> Void)? = nil) throws(ImageError) {
        let cb = UInt64(image.clusterBytes)
        let virtual = image.virtualBytes
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cb), alignment: 4096)
        defer { buffer.deallocate() }
        let clusters = (virtual + cb - 1) / cb
        var done: UInt64 = 0
        var next: UInt64 = 0
        for range in try raw.dataRanges(from: 0, to: virtual) {
            // Two ranges can share a cluster: each cluster is copied once.
            var c = max(range.lowerBound / cb, next)
            while c * cb < range.upperBound, c < clusters {
                let at = c * cb
                let length = Int(min(cb, virtual - at))
                buffer.initializeMemory(as: UInt8.self, repeating: 0)
                _ = try raw.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length]), at: at)
                if buffer.contains(where: { $0 != 0 }) {
                    try image.write(cluster: ClusterIndex(c), data: UnsafeRawBufferPointer(buffer))
                }
                c += 1
                next = c
                done += 1
                if done % 1024 == 0 {
                    try image.flush()
                    progress?(Int(c), Int(clusters))
                }
            }
        }
        try image.close()
        progress?(Int(clusters), Int(clusters))
    }
}
