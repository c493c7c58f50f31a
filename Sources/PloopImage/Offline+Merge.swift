import Dispatch
import PloopFormat
import PloopSystem
import Synchronization

/// Where an offline merge writes.
public enum MergeDestination: Sendable {
    case ploop1(Ploop1Image)
    case raw(RawImage)
}

/// A cluster of a merge and the copy that wins it: the top-most source's.
public struct MergeWinner: Sendable, Equatable {
    public var cluster: ClusterIndex
    /// Which source (an index into them, top-most first).
    public var source: Int
    public var block: ImageBlock
}

extension Offline {
    /// A reverse merge of the top into `destination` (dm-ploop) got past dropping the entries the
    /// top shadowed: from then on the device may write the destination as its top, so its
    /// clusters are the newer ones. The file exists from that point until the merge is done; a
    /// recovery that finds it keeps the destination's clusters.
    public static func reverseMergeMarker(of destination: String) -> String { destination + ".reverse-merge" }

    /// Every virtual cluster below `clusters` that some source maps, in cluster order, with the
    /// top-most source's copy (`sources` top-most first). Only mapped clusters are listed: a
    /// sparse 32 TiB image has a billion that none maps. The offline merge and the device's merge
    /// of levels below its top both copy these.
    public static func winners(of sources: [Ploop1Image], below clusters: UInt64 = .max) -> [MergeWinner] {
        var all: [MergeWinner] = []
        for (i, s) in sources.enumerated() {
            for (c, b) in s.allocatedClusters() where c.value < clusters { all.append(MergeWinner(cluster: c, source: i, block: b)) }
        }
        all.sort { ($0.cluster.value, $0.source) < ($1.cluster.value, $1.source) }
        // The first of each cluster is the top-most source's; the rest go, in place.
        var kept = 0
        for w in all.indices where kept == 0 || all[kept - 1].cluster != all[w].cluster {
            all[kept] = all[w]
            kept += 1
        }
        all.removeLast(all.count - kept)
        return all
    }

    public struct MergeSummary: Sendable, Codable, Equatable {
        public var clustersCopied: Int
        public var destinationGrew: Bool
        public var repairedStaleMark: Bool
    }

    /// Copies, for every virtual cluster, the copy held by the top-most source that has it into
    /// `destination` (sources are given top-most first). Growing the destination first if a source
    /// is larger. Whole clusters, as the original does. Idempotent: running it again after an
    /// interruption finishes the job.
    /// `relocated` is passed to the destination's grow (see `Ploop1Image.grow`). `copyStreams`
    /// clusters are copied at a time. With `keepDestination` a cluster the destination maps keeps
    /// its copy (the destination's are the newer ones: a device wrote it as its top after a
    /// reverse merge's flip).
    public static func merge(
        sources: [Ploop1Image], into destination: MergeDestination, flushEvery: Int = 256, copyStreams: Int = 4, keepDestination: Bool = false,
        progress: ((Int, Int) -> Void)? = nil, relocated: ((ClusterIndex, ImageBlock) throws(ImageError) -> Void)? = nil
    ) throws(ImageError) -> MergeSummary {
        guard let first = sources.first else { throw .noSources }
        let cb = first.clusterBytes
        let largest = sources.map(\.virtualBytes).max()!
        let clusters = Int((largest + UInt64(cb) - 1) / UInt64(cb))
        var grew = false
        switch destination {
        case .ploop1(let dst):
            if largest > dst.virtualBytes {
                try dst.grow(toSectors: largest / PloopSpec.sectorSize, relocated: relocated)
                grew = true
            }
        case .raw(let dst):
            if largest > (try dst.file.size()) {
                try dst.file.truncate(to: largest)
                try dst.file.sync()
                grew = true
            }
        }
        // A raw destination ends at the virtual size, even inside its last cluster.
        let rawEnd: UInt64 = if case .raw(let dst) = destination { max(try dst.file.size(), largest) } else { 0 }
        var winners = winners(of: sources, below: UInt64(clusters))
        if keepDestination, case .ploop1(let dst) = destination { winners.removeAll { dst.block(of: $0.cluster) != nil } }
        // Parallel streams over runs of consecutive clusters (as qemu-img convert does): a cold
        // source is read with several requests in flight. A small flushEvery (tests that cut
        // power between writes) keeps the copies one at a time.
        let streams = max(1, min(copyStreams, flushEvery))
        let run = streams > 1 ? min(flushEvery, 16 * streams) : 1
        let scratch = (0..<streams).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: cb, alignment: 4096) }
        defer { for s in scratch { s.deallocate() } }
        var copied = 0
        var sinceFlush = 0
        var next = 0
        while next < winners.count {
            let part = Array(winners[next..<min(next + run, winners.count)])
            switch destination {
            case .ploop1(let dst):
                let targets = try part.map { w throws(ImageError) in try dst.blockForCopy(w.cluster) }
                try inParallel(part.count, streams: streams, scratch: scratch) { k, s throws(ImageError) in
                    let src = sources[part[k].source]
                    try dst.file.copy(from: src.file, at: src.blockOffset(part[k].block), to: dst.blockOffset(targets[k].block), length: cb, scratch: s)
                }
                for (k, t) in targets.enumerated() { dst.copied(part[k].cluster, into: t) }
            case .raw(let dst):
                try inParallel(part.count, streams: streams, scratch: scratch) { k, s throws(ImageError) in
                    let src = sources[part[k].source]
                    let at = part[k].cluster.value * UInt64(cb)
                    let length = Int(min(UInt64(cb), rawEnd - at))
                    try dst.file.copy(from: src.file, at: src.blockOffset(part[k].block), to: at, length: length, scratch: s)
                }
            }
            next += part.count
            copied += part.count
            sinceFlush += part.count
            if sinceFlush >= flushEvery, case .ploop1(let dst) = destination {
                try dst.flush()
                sinceFlush = 0
            }
            progress?(next, winners.count)
        }
        switch destination {
        case .ploop1(let dst): try dst.flush()
        case .raw(let dst): try dst.file.sync()
        }
        return MergeSummary(clustersCopied: copied, destinationGrew: grew, repairedStaleMark: false)
    }

    /// `ploop merge [-f raw|ploop1] SRC... DST`: validates every argument before touching anything.
    public static func merge(
        sources paths: [String], destination dstPath: String, format: ImageFormat, keepDestination: Bool = false,
        progress: ((Int, Int) -> Void)? = nil
    ) throws(ImageError) -> MergeSummary {
        guard !paths.isEmpty else { throw .noSources }
        var seen: [FileIdentity: String] = [:]
        var files: [PosixBlockFile] = []
        for p in paths {
            let f = try ImagePath.open(p, write: false)
            if let id = f.file.identity {
                if let other = seen[id] { throw .sameFile(other, p) }
                seen[id] = p
            }
            files.append(f)
        }
        let dstFile = try ImagePath.open(dstPath, write: true)
        if let id = dstFile.file.identity, let other = seen[id] { throw .sameFile(other, dstPath) }
        // Read and validate every header before the first write.
        var sources: [Ploop1Image] = []
        for f in files {
            guard try ImagePath.detectFormat(f) == .ploop1 else { throw .notPloop1(f.path) }
            let image = try Ploop1Image(file: f, writable: false)
            if image.header.inUse { throw .inUse(f.path) }
            if let c = sources.first?.clusterBytes, c != image.clusterBytes {
                throw .clusterSizeMismatch(f.path, clusterBytes: image.clusterBytes, expected: c)
            }
            sources.append(image)
        }
        let cb = sources[0].clusterBytes
        let detected = try ImagePath.detectFormat(dstFile)
        if format == .raw && detected == .ploop1 { throw .looksLikePloop1(dstPath) }
        if format == .ploop1 && detected != .ploop1 { throw .notPloop1(dstPath) }
        for f in files { try ImagePath.lock(f, exclusive: false) }
        try ImagePath.lock(dstFile, exclusive: true)
        // Nothing is trusted that 'check' would call corrupt: a shared block or an entry past the
        // end would have the merge copy one cluster's data over another's, or grow the file.
        for f in files { try Checker.validate(f) }
        if format == .ploop1, !(try Ploop1Image(file: dstFile, writable: false).header.inUse) { try Checker.validate(dstFile) }
        var repaired = false
        let destination: MergeDestination
        switch format {
        case .raw:
            destination = .raw(RawImage(file: dstFile, clusterBytes: cb))
        case .ploop1:
            let probe = try Ploop1Image(file: dstFile, writable: false)
            if probe.clusterBytes != cb {
                throw .clusterSizeMismatch(dstPath, clusterBytes: probe.clusterBytes, expected: cb)
            }
            let largest = sources.map(\.virtualBytes).max()!
            if largest > probe.virtualBytes {
                // Refuse a growth the destination's version cannot hold before the first write.
                do {
                    _ = try ImageHeader.new(sizeSectors: largest / PloopSpec.sectorSize, clusterSectors: probe.header.clusterSectors, version: probe.header.version)
                } catch { throw .format(dstPath, error) }
            }
            if probe.header.inUse {
                // We hold the lock, so no live writer has it: the mark is stale (an earlier merge or
                // device died). Check and repair it, as mount does, then carry on.
                try Checker.repairStaleMark(dstFile)
                repaired = true
            }
            destination = .ploop1(try Ploop1Image(file: dstFile, writable: true))
        }
        var summary = try merge(sources: sources, into: destination, keepDestination: keepDestination, progress: progress)
        if case .ploop1(let dst) = destination { try dst.close() }
        summary.repairedStaleMark = repaired
        return summary
    }
}

/// Runs `body(k, scratch)` for k in 0..<count on up to `streams` threads, each taking a run of
/// consecutive k with its own scratch buffer; the first error is thrown once all have stopped.
func inParallel(
    _ count: Int, streams: Int, scratch: [UnsafeMutableRawBufferPointer],
    _ body: @Sendable (Int, UnsafeMutableRawBufferPointer) throws(ImageError) -> Void
) throws(ImageError) {
    let n = min(streams, count, scratch.count)
    if n <= 1 {
        for k in 0..<count { try body(k, scratch[0]) }
        return
    }
    // Each thread uses only its own buffer.
    struct Buffers: @unchecked Sendable { let all: [UnsafeMutableRawBufferPointer] }
    let buffers = Buffers(all: scratch)
    let failure = Mutex<ImageError?>(nil)
    DispatchQueue.concurrentPerform(iterations: n) { s in
        let scratch = buffers.all
        for k in (s * count / n)..<((s + 1) * count / n) {
            if failure.withLock({ $0 != nil }) { return }
            do throws(ImageError) { try body(k, scratch[s]) } catch {
                failure.withLock { f in if f == nil { f = error } }
                return
            }
        }
    }
    if let e = failure.withLock({ $0 }) { throw e }
}
