import PloopFormat
import Synchronization

/// One ploop1 delta on a file: the header and the BAT held in memory, the BAT's all-zero pages
/// left out (memory grows with what the image maps, never with its virtual size).
///
/// Crash-safe ordering: a new cluster's data is written first; its BAT entry is written to the file
/// only by `flush()`, after a sync has made the data durable, and followed by another sync. A crash
/// in between leaves an unreferenced cluster at the tail, which `ploop check` trims.
public final class Ploop1Image: Sendable {
    public let file: any BlockFile
    public let writable: Bool
    private let state: Mutex<State>
    /// Serialises flushes, so a flush returns only after every entry committed before it is on disk.
    private let flushLock = Mutex(())

    struct State {
        var header: ImageHeader
        var bat: SparseBAT
        /// First block past the last one in use: new clusters are appended here.
        var allocHead: UInt32
        /// BAT entries changed in memory but not yet written to the file.
        var pendingEntries: Set<Int> = []
        var dataWritten = false
    }

    public var path: String { file.path }
    public var header: ImageHeader { state.withLock { $0.header } }
    public var layout: BATLayout { state.withLock { $0.header.layout } }
    public var clusterBytes: Int { state.withLock { $0.header.clusterBytes } }
    public var allocHead: UInt32 { state.withLock { $0.allocHead } }
    public var virtualBytes: UInt64 { state.withLock { $0.header.virtualBytes } }

    // MARK: - Create and open

    /// Writes a new, empty image into an empty file: the header, and a BAT area that is a hole
    /// (zeros need no writing: a 50 TiB image with 32 KiB clusters has a 6.7 GB BAT, all zeros),
    /// then synced.
    public static func create(on file: any BlockFile, header: ImageHeader) throws(ImageError) {
        let layout = header.layout
        try file.truncate(to: 0)
        try file.truncate(to: layout.firstDataOffset)
        try file.writeBytes(header.encode(), at: 0)
        try file.sync()
    }

    /// Opens an image. With `writable`, the in-use mark is set (and synced) before this returns
    /// (unless `markInUse` is false: for changes that keep the image sound at every write, so a
    /// crash leaves it clean); an image whose mark is already set is refused unless `allowDirty`.
    public init(file: any BlockFile, writable: Bool, allowDirty: Bool = false, markInUse: Bool = true) throws(ImageError) {
        let size = try file.size()
        let headerBytes = try file.readBytes(PloopSpec.headerSize, at: 0)
        let header: ImageHeader
        do { header = try ImageHeader.decode(headerBytes) } catch { throw .format(file.path, error) }
        let layout = header.layout
        let batEnd = UInt64(header.firstBlockOffset) * PloopSpec.sectorSize
        guard size >= batEnd else { throw .truncated(file.path, size: size, needed: batEnd) }
        if header.inUse && header.flags.contains(.versionConvert) { throw .versionConverting(file.path) }
        if writable && header.inUse && !allowDirty { throw .inUse(file.path) }
        var bat = SparseBAT(count: Int(header.batEntries))
        try BATScan.forEachNonZero(file, count: Int(header.batEntries)) { i, e in bat[i] = e }
        let firstBlock = UInt32(header.firstBlockOffset / header.clusterSectors)
        // A length that is not a whole number of clusters is an interrupted extension: the next
        // allocation overwrites the partial cluster.
        let head = max(firstBlock, UInt32(clamping: size / UInt64(layout.clusterBytes)))
        self.file = file
        self.writable = writable
        self.state = Mutex(State(header: header, bat: bat, allocHead: head))
        file.metadataEnds(at: batEnd)
        if writable && markInUse {
            try setInUse(true)
        }
    }

    /// Writes the in-use mark (or clears it), with `CIF_Empty` saying whether data exist, and syncs.
    public func setInUse(_ inUse: Bool) throws(ImageError) {
        guard writable else { throw .readOnly(path) }
        let bytes = state.withLock { s -> [UInt8] in
            s.header.inUse = inUse
            s.header.flags = Self.flags(s.header.flags, hasData: Self.hasData(s))
            return s.header.encode()
        }
        try file.writeBytes(bytes, at: 0)
        try file.sync()
    }

    /// The header part of PLOOP_IOC_SYNC: rewrites the header (in-use mark kept) once `CIF_Empty`
    /// no longer says whether the image holds data, so a copy of the file is right about it.
    public func refreshEmptyFlag() throws(ImageError) {
        guard writable else { return }
        let (stale, inUse) = state.withLock { s in
            (Self.flags(s.header.flags, hasData: Self.hasData(s)) != s.header.flags, s.header.inUse)
        }
        if stale { try setInUse(inUse) }
    }

    /// Flushes and clears the in-use mark: the image is clean on disk when this returns.
    public func close() throws(ImageError) {
        guard writable else { return }
        try flush()
        try setInUse(false)
    }

    static func hasData(_ s: State) -> Bool {
        s.bat.nonZero > 0
    }

    static func flags(_ flags: ImageFlags, hasData: Bool) -> ImageFlags {
        var f = flags
        if hasData { f.remove(.empty) } else { f.insert(.empty) }
        return f
    }

    // MARK: - Lookup

    /// The block holding a virtual cluster in this delta, or nil if it has none (or the entry is
    /// unusable: misaligned v1, or pointing into the header; `check` reports those).
    public func block(of cluster: ClusterIndex) -> ImageBlock? {
        state.withLock { s in Self.block(s, cluster) }
    }

    static func block(_ s: State, _ cluster: ClusterIndex) -> ImageBlock? {
        guard cluster.value < UInt64(s.bat.count) else { return nil }
        let entry = s.bat[Int(cluster.value)]
        guard entry != 0, let b = try? s.header.layout.decode(entry) else { return nil }
        return b
    }

    /// Every allocated cluster with its block, in cluster order.
    public func allocatedClusters() -> [(ClusterIndex, ImageBlock)] {
        state.withLock { s in
            var out: [(ClusterIndex, ImageBlock)] = []
            s.bat.forEachNonZero { i, _ in
                if let b = Self.block(s, ClusterIndex(UInt64(i))) { out.append((ClusterIndex(UInt64(i)), b)) }
            }
            return out
        }
    }

    public var allocatedCount: Int { state.withLock { s in s.bat.nonZero } }

    public func blockOffset(_ block: ImageBlock) -> UInt64 { UInt64(block.value) * UInt64(clusterBytes) }

    // MARK: - Data

    /// Reads a whole cluster. Returns false (buffer untouched) if this delta does not have it.
    public func read(cluster: ClusterIndex, into buffer: UnsafeMutableRawBufferPointer) throws(ImageError) -> Bool {
        guard let b = block(of: cluster) else { return false }
        let n = try file.read(into: buffer, at: blockOffset(b))
        if n < buffer.count { buffer[n...].initializeMemory(as: UInt8.self, repeating: 0) }
        return true
    }

    /// Writes a whole cluster: in place if allocated, else at the allocation head with the BAT
    /// entry left pending until `flush()`.
    public func write(cluster: ClusterIndex, data: UnsafeRawBufferPointer) throws(ImageError) {
        precondition(data.count == clusterBytes, "whole-cluster writes only")
        let target = try blockForWrite(cluster)
        try file.write(data, at: blockOffset(target.block))
        if target.isNew { commit(cluster, target.block) } else { state.withLock { $0.dataWritten = true } }
    }

    /// Copies a whole cluster from another file straight into this image (kernel-side where the
    /// files allow it), allocating like `write`.
    public func copy(cluster: ClusterIndex, from source: any BlockFile, at offset: UInt64, scratch: UnsafeMutableRawBufferPointer) throws(ImageError) {
        let target = try blockForCopy(cluster)
        try file.copy(from: source, at: offset, to: blockOffset(target.block), length: clusterBytes, scratch: scratch)
        copied(cluster, into: target)
    }

    /// Where a whole-cluster copy made by the caller goes (copies in parallel take their blocks
    /// in cluster order first, so the layout is a sequential copy's): the cluster's block, or a
    /// new one at the allocation head that nothing points at until `copied(_:into:)`.
    public func blockForCopy(_ cluster: ClusterIndex) throws(ImageError) -> CopyTarget {
        let t = try blockForWrite(cluster)
        return CopyTarget(block: t.block, isNew: t.isNew)
    }

    /// The data of a copy into `target` is written: a new block gets its BAT entry (on disk at
    /// the next flush, after the data is synced).
    public func copied(_ cluster: ClusterIndex, into target: CopyTarget) {
        if target.isNew { commit(cluster, target.block) } else { state.withLock { $0.dataWritten = true } }
    }

    public struct CopyTarget: Sendable, Equatable {
        public var block: ImageBlock
        public var isNew: Bool
    }

    private func blockForWrite(_ cluster: ClusterIndex) throws(ImageError) -> (block: ImageBlock, isNew: Bool) {
        guard writable else { throw .readOnly(path) }
        let r: Result<(ImageBlock, Bool), ImageError> = state.withLock { s in
            guard cluster.value < UInt64(s.bat.count) else {
                return .failure(.corrupt(path, "write to \(cluster) beyond the virtual size"))
            }
            if let b = Self.block(s, cluster), b.value >= s.header.layout.batClusters { return .success((b, false)) }
            let b = ImageBlock(s.allocHead)
            guard s.header.layout.canEncode(b) else { return .failure(.fileTooLarge(path, block: b.value)) }
            s.allocHead += 1
            return .success((b, true))
        }
        return try r.get()
    }

    private func commit(_ cluster: ClusterIndex, _ block: ImageBlock) {
        commit(cluster: cluster, block: block)
    }

    /// Makes every write durable: sync data, write the pending BAT entries, sync again; then, the
    /// first time the image holds data, the header without `CIF_Empty` (in-use mark kept), so an
    /// image a crash leaves behind does not say it is empty while its BAT maps clusters.
    public func flush() throws(ImageError) {
        guard writable else { return }
        try flushLock.withLock { _ throws(ImageError) in
            let (pending, dirty) = state.withLock { s -> ([(Int, [UInt8])], Bool) in
                let dirty = s.dataWritten
                s.dataWritten = false
                guard !s.pendingEntries.isEmpty else { return ([], dirty) }
                let runs = Self.entryRuns(s.pendingEntries.sorted(), bat: s.bat)
                s.pendingEntries.removeAll()
                return (runs, dirty)
            }
            guard dirty || !pending.isEmpty else { return }
            try file.sync()
            guard !pending.isEmpty else { return }
            for (first, bytes) in pending {
                try file.writeBytes(bytes, at: UInt64(PloopSpec.headerSize) + 4 * UInt64(first))
            }
            try file.sync()
            try refreshEmptyFlag()
        }
    }

    // MARK: - Primitives for the device model (partial writes, chosen blocks)

    /// Takes the next block at the allocation head for `cluster`'s new data. The caller writes the
    /// data, then `commit`s; until then nothing points at the block.
    public func reserveBlock() throws(ImageError) -> ImageBlock {
        guard writable else { throw .readOnly(path) }
        let r: Result<ImageBlock, ImageError> = state.withLock { s in
            let b = ImageBlock(s.allocHead)
            guard s.header.layout.canEncode(b) else { return .failure(.fileTooLarge(path, block: b.value)) }
            s.allocHead += 1
            return .success(b)
        }
        return try r.get()
    }

    /// Writes bytes inside a block (data path; no BAT change).
    public func write(block: ImageBlock, offset: Int, data: UnsafeRawBufferPointer) throws(ImageError) {
        try file.write(data, at: blockOffset(block) + UInt64(offset))
        state.withLock { $0.dataWritten = true }
    }

    /// Says that data reached a block by a path of the caller's (asynchronous direct I/O), so the
    /// next `flush` syncs it. After the write completed, before it is acknowledged.
    public func dataWrittenDirectly() {
        state.withLock { $0.dataWritten = true }
    }

    /// Makes bytes inside a block read as zeros, giving their space back to the host file system
    /// where it can (discard). The block stays mapped: it still hides what lower deltas hold.
    public func punch(block: ImageBlock, offset: Int, length: Int) throws(ImageError) {
        try file.punchHole(at: blockOffset(block) + UInt64(offset), length: UInt64(length))
        state.withLock { $0.dataWritten = true }
    }

    /// Reads bytes inside a block; past the end of the file reads zeros.
    public func read(block: ImageBlock, offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(ImageError) {
        let n = try file.read(into: buffer, at: blockOffset(block) + UInt64(offset))
        if n < buffer.count { buffer[n...].initializeMemory(as: UInt8.self, repeating: 0) }
    }

    /// Gives a reserved block real space that reads as zeros (`fallocate`), so a partial write
    /// into a new cluster need not write the whole cluster.
    public func preallocate(block: ImageBlock) throws(ImageError) {
        try file.allocate(at: blockOffset(block), length: UInt64(clusterBytes))
    }

    /// Points `cluster` at `block` in memory; the entry reaches the file at the next `flush()`.
    public func commit(cluster: ClusterIndex, block: ImageBlock) {
        state.withLock { s in
            s.bat[Int(cluster.value)] = s.header.layout.encode(block)
            s.pendingEntries.insert(Int(cluster.value))
            s.dataWritten = true
        }
    }

    /// Truncates the file to `blocks` clusters and moves the allocation head there.
    public func truncate(toBlocks blocks: UInt32) throws(ImageError) {
        try file.truncate(to: UInt64(blocks) * UInt64(clusterBytes))
        try file.sync()
        state.withLock { $0.allocHead = blocks }
    }

    /// First block after the header/BAT area.
    public var firstDataBlock: UInt32 { state.withLock { $0.header.firstBlockOffset / $0.header.clusterSectors } }

    /// Groups entries into runs no longer than one 4 KiB page, so each write stays within one
    /// page and each 4-byte entry within one sector (never torn).
    static func entryRuns(_ sorted: [Int], bat: SparseBAT) -> [(Int, [UInt8])] {
        var runs: [(Int, [UInt8])] = []
        var i = 0
        while i < sorted.count {
            let first = sorted[i]
            let page = (PloopSpec.headerSize + 4 * first) / 4096
            var last = first
            var j = i + 1
            while j < sorted.count, (PloopSpec.headerSize + 4 * sorted[j]) / 4096 == page {
                last = sorted[j]
                j += 1
            }
            var bytes = [UInt8](repeating: 0, count: 4 * (last - first + 1))
            bytes.withUnsafeMutableBytes { b in
                for k in first...last { b.storeLE32(bat[k], at: 4 * (k - first)) }
            }
            runs.append((first, bytes))
            i = j
        }
        return runs
    }

    // MARK: - Metadata changes used by grow, check and repair

    /// Sets one BAT entry and writes it at once (the caller syncs).
    /// Points `cluster` at `block` (or at nothing) in memory and on disk (the caller syncs). If the
    /// write fails, the entry in memory goes back to what it was: memory never says more than the
    /// file may, or a caller that trusts it (a retried relocation) would cut away a block the file's
    /// BAT still points at.
    public func setEntry(_ cluster: ClusterIndex, to block: ImageBlock?) throws(ImageError) {
        let (bytes, old, wasPending) = state.withLock { s -> ([UInt8], UInt32, Bool) in
            let old = s.bat[Int(cluster.value)]
            let v = block.map { s.header.layout.encode($0) } ?? 0
            s.bat[Int(cluster.value)] = v
            let wasPending = s.pendingEntries.remove(Int(cluster.value)) != nil
            var b = [UInt8](repeating: 0, count: 4)
            b.withUnsafeMutableBytes { $0.storeLE32(v, at: 0) }
            return (b, old, wasPending)
        }
        do {
            try file.writeBytes(bytes, at: layout.entryOffset(cluster))
        } catch {
            state.withLock { s in
                s.bat[Int(cluster.value)] = old
                if wasPending { s.pendingEntries.insert(Int(cluster.value)) }
            }
            throw error
        }
    }

    /// Replaces the header in memory and on disk (the caller syncs), growing the BAT array. If
    /// the write fails, memory keeps the old header: a later flush or close writes the header
    /// from memory, and must not publish one the file never took (a bigger size, say).
    func replaceHeader(_ header: ImageHeader, allocHead: UInt32? = nil) throws(ImageError) {
        // Raised before the BAT can reach past the old end (the floor never comes down).
        file.metadataEnds(at: UInt64(header.firstBlockOffset) * PloopSpec.sectorSize)
        let (oldHeader, oldHead) = state.withLock { s in
            let old = (s.header, s.allocHead)
            s.header = header
            s.bat.grow(to: Int(header.batEntries))
            if let allocHead { s.allocHead = allocHead }
            return old
        }
        do {
            try file.writeBytes(header.encode(), at: 0)
        } catch {
            state.withLock { s in
                s.header = oldHeader
                s.allocHead = oldHead
            }
            throw error
        }
    }

    /// Puts `header` back in memory, then (best effort) in the file: an operation that could not
    /// make its new header durable goes back to the old one.
    func restoreHeader(_ header: ImageHeader) {
        state.withLock { $0.header = header }
        try? file.writeBytes(header.encode(), at: 0)
    }

    func setAllocHead(_ head: UInt32) { state.withLock { $0.allocHead = head } }

    /// Reverse map: which cluster each block of the file holds (for relocation).
    public func owners() -> [UInt32: ClusterIndex] {
        var map: [UInt32: ClusterIndex] = [:]
        for (c, b) in allocatedClusters() { map[b.value] = c }
        return map
    }
}
