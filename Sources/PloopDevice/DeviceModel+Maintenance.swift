import PloopFormat
import PloopImage
import Synchronization
import PloopSystem

extension DeviceModel {
    /// Runs an exclusive maintenance operation in its state, back to OFF afterwards (also on error).
    func maintenance<T>(_ op: MaintenanceState, _ body: () throws(DeviceError) -> T) throws(DeviceError) -> T {
        try requireRunning()
        try control.withLock { c throws(DeviceError) in try c.machine.begin(op) }
        defer { control.withLock { $0.machine.end(op) } }
        return try body()
    }

    func requireRunning() throws(DeviceError) {
        guard stack.read({ $0.running }) else { throw .notRunning("device") }
    }

    // MARK: - Snapshot

    /// PLOOP_IOC_SNAPSHOT: a new empty ploop1 delta becomes the writable top; the old top is
    /// flushed, marked clean and kept read-only. Atomic with respect to I/O: every write
    /// acknowledged before this call is in the old top, every later one in the new.
    public func snapshot(newDelta path: String) throws(DeviceError) {
        try maintenance(.snapshot) { () throws(DeviceError) in
            let (size, version) = stack.read { s -> (UInt64, FormatVersion) in
                if case .ploop1(let i) = s.top.image { return (s.sizeBytes, i.header.version) }
                return (s.sizeBytes, .v2)
            }
            guard size % UInt64(clusterBytes) == 0 else {
                throw .notClusterMultiple(bytes: size, clusterBytes: clusterBytes)
            }
            let header: ImageHeader
            switch Result(catching: { () throws(FormatError) in
                try ImageHeader.new(sizeSectors: size / PloopSpec.sectorSize, clusterSectors: UInt32(clusterBytes / 512), version: version)
            }) {
            case .success(let h): header = h
            case .failure(let e): throw .image(.format(path, e))
            }
            let file = try lifting { () throws(ImageError) in try opener.createImage(path, header: header) }
            do throws(DeviceError) {
                try stack.write { s throws(DeviceError) in
                    guard s.running, !s.top.readOnly else { throw .readOnly("device") }
                    let old = s.top
                    let newTop = try lifting { () throws(ImageError) in
                        try Ploop1Image(file: TrackingBlockFile(file, watch: watch), writable: true)
                    }
                    do throws(DeviceError) {
                        try lifting { () throws(ImageError) in
                            switch old.image {
                            case .ploop1(let i):
                                try i.close()
                                s.levels[s.levels.count - 1].image = .ploop1(try Ploop1Image(file: i.file, writable: false))
                            case .raw(let r):
                                try r.file.sync()
                            }
                        }
                    } catch {
                        // The old top stays the top; the new file is dropped below.
                        try? lifting { () throws(ImageError) in try newTop.close() }
                        throw error
                    }
                    s.levels[s.levels.count - 1].readOnly = true
                    s.levels.append(Level(path: path, image: .ploop1(newTop), readOnly: false, lockedFile: file))
                    // The old top is shared from now on (another read-only stack may use it).
                    relockLevels(s.levels)
                }
            } catch {
                opener.remove(path)
                throw error
            }
        }
    }

    // MARK: - Merge

    /// Online merge of levels `l1...l2` into `l1` while I/O continues: for every cluster the copy in
    /// the highest of `l1+1...l2` is copied into `l1`; then those levels leave the stack and the ones
    /// above renumber. When `l2` is the top, `l1` becomes the writable top at the end; until then
    /// writes keep going to the old top (and, when the top is merged, into `l1` as well for
    /// clusters already copied there; see `mergeTop`), so a crash at
    /// any moment leaves the old stack intact. Returns the files that left the stack.
    @discardableResult
    public func merge(levels range: ClosedRange<Int>, progress: (@Sendable (Int, Int) -> Void)? = nil) throws(DeviceError) -> [String] {
        try maintenance(.merge) { () throws(DeviceError) in
            let top = stack.read { $0.levels.count - 1 }
            guard range.lowerBound >= 0, range.upperBound <= top, range.lowerBound < range.upperBound else {
                throw .levelsOutOfRange(range, top: top)
            }
            defer {
                control.withLock { $0.mergeProgress = nil }
                stack.read { relockLevels($0.levels) }
            }
            var removed: [String] = []
            if range.upperBound < top {
                removed += try mergeLower(range, progress: progress)
            } else {
                if range.upperBound - range.lowerBound > 1 {
                    removed += try mergeLower(range.lowerBound...range.upperBound - 1, progress: progress)
                }
                removed += try mergeTop(into: range.lowerBound, progress: progress)
            }
            return removed
        }
    }

    /// Each level's lock to its kind: the writable top exclusive, read-only levels shared (so
    /// another read-only stack may use them). Best effort: a level whose lock cannot change keeps
    /// the one it has.
    func relockLevels(_ levels: [Level]) {
        for l in levels {
            guard let h = l.lockedFile else { continue }
            try? lifting { () throws(ImageError) in try opener.relock(h, exclusive: !l.readOnly) }
        }
    }

    /// Opens level `l` for writing and makes the stack use that instance (so reads and the copier
    /// see one BAT), growing it to the device size if it is smaller.
    func openForMerge(_ l: Int, tracked: Bool) throws(DeviceError) -> DeltaImage {
        try stack.write { s throws(DeviceError) -> DeltaImage in
            let level = s.levels[l]
            // The destination is written: no other stack may read it meanwhile.
            if let h = level.lockedFile {
                do throws(ImageError) { try opener.relock(h, exclusive: true) } catch {
                    try? lifting { () throws(ImageError) in try opener.relock(h, exclusive: false) }
                    throw .image(.locked(level.path))
                }
            }
            let raw = try lifting { () throws(ImageError) in try opener.open(level.path, writable: true, lock: false) }
            let file: any BlockFile = tracked ? TrackingBlockFile(raw, watch: watch) : raw
            let needed = s.levels[(l + 1)...].map { lv -> UInt64 in
                if case .ploop1(let i) = lv.image { return i.virtualBytes }
                return lv.rawBytes
            }.max() ?? 0
            switch level.image {
            case .ploop1:
                let image = try lifting { () throws(ImageError) in try Ploop1Image(file: file, writable: true, allowDirty: callerOwnsInUse) }
                if image.virtualBytes < needed {
                    try lifting { () throws(ImageError) in try image.grow(toSectors: needed / PloopSpec.sectorSize) }
                }
                s.levels[l].image = .ploop1(image)
                return .ploop1(image)
            case .raw:
                let r = RawImage(file: file, clusterBytes: clusterBytes)
                if level.rawBytes < needed {
                    try lifting { () throws(ImageError) in
                        try file.truncate(to: needed)
                        try file.sync()
                    }
                    s.levels[l].rawBytes = needed
                }
                s.levels[l].image = .raw(r)
                return .raw(r)
            }
        }
    }

    /// Copies cluster `c` from `source` (whole cluster) into `dest`.
    func copyCluster(_ c: UInt64, from source: Ploop1Image, _ block: ImageBlock, into dest: DeltaImage, scratch: UnsafeMutableRawBufferPointer) throws(DeviceError) {
        try lifting { () throws(ImageError) in
            switch dest {
            case .ploop1(let d):
                try d.copy(cluster: ClusterIndex(c), from: source.file, at: source.blockOffset(block), scratch: scratch)
            case .raw(let r):
                try r.file.copy(from: source.file, at: source.blockOffset(block), to: c * UInt64(clusterBytes), length: clusterBytes, scratch: scratch)
            }
        }
    }

    func flushDelta(_ d: DeltaImage) throws(DeviceError) {
        try lifting { () throws(ImageError) in
            switch d {
            case .ploop1(let i): try i.flush()
            case .raw(let r): try r.file.sync()
            }
        }
    }

    /// Merges read-only levels l1+1...l2 (all below the top) into l1.
    func mergeLower(_ range: ClosedRange<Int>, progress: (@Sendable (Int, Int) -> Void)?) throws(DeviceError) -> [String] {
        let l1 = range.lowerBound
        let dest = try openForMerge(l1, tracked: false)
        // The winner of each cluster: the highest source level that has it (top-most first).
        let sources: [Ploop1Image] = try stack.read { s throws(DeviceError) in
            try s.levels[(l1 + 1)...range.upperBound].reversed().map { lv throws(DeviceError) in
                guard case .ploop1(let i) = lv.image else { throw .invalid("only the base may be raw") }
                return i
            }
        }
        let winners = Offline.winners(of: sources)
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: clusterBytes, alignment: 4096)
        defer { scratch.deallocate() }
        for (i, w) in winners.enumerated() {
            let (c, src) = (w.cluster.value, sources[w.source])
            try stack.read { _ throws(DeviceError) in
                try locks.with(c) { () throws(DeviceError) in try copyCluster(c, from: src, w.block, into: dest, scratch: scratch) }
            }
            if i % 256 == 255 { try flushDelta(dest) }
            reportProgress(i + 1, winners.count, progress)
        }
        return try stack.write { s throws(DeviceError) -> [String] in
            try flushDelta(dest)
            if case .ploop1(let d) = dest {
                try lifting { () throws(ImageError) in
                    try d.close()
                    s.levels[l1].image = .ploop1(try Ploop1Image(file: d.file, writable: false))
                }
            }
            let removed = s.levels[(l1 + 1)...range.upperBound].map(\.path)
            s.levels.removeSubrange((l1 + 1)...range.upperBound)
            return removed
        }
    }

    /// Merges the top into level l1 (= top − 1), which becomes the top.
    ///
    /// Writes go on meanwhile: each one to a cluster already copied is mirrored into l1 as well
    /// (under the cluster lock the copier takes too), so a cluster needs copying again only if the
    /// top allocated it after the copier passed it, which happens at most once per cluster. The
    /// passes therefore shrink to nothing, and the pause at the switch (I/O held while the last
    /// few clusters are copied and l1 is flushed) stays short however hard the device is written.
    func mergeTop(into l1: Int, progress: (@Sendable (Int, Int) -> Void)?) throws(DeviceError) -> [String] {
        let dest = try openForMerge(l1, tracked: true)
        guard case .ploop1(let top) = stack.read({ $0.top.image }) else { throw .invalid("the top of a stack is never raw here") }
        let m = MergeMirror(dest: dest, clusterBytes: clusterBytes, clusters: top.virtualBytes / UInt64(clusterBytes))
        // Installed and removed under the exclusive lock: a write in flight sees it throughout or
        // not at all.
        stack.write { _ in
            mirror.withLock { $0 = m }
            merging.store(true, ordering: .relaxed)
        }
        func uninstall() {
            merging.store(false, ordering: .relaxed)
            mirror.withLock { $0 = nil }
        }
        defer { if merging.load(ordering: .relaxed) { stack.write { _ in uninstall() } } }
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: clusterBytes, alignment: 4096)
        defer { scratch.deallocate() }
        func copy(_ c: UInt64) throws(DeviceError) {
            m.forget(c)
            if let b = top.block(of: ClusterIndex(c)) {
                try copyCluster(c, from: top, b, into: dest, scratch: scratch)
                m.copied(c)
            }
        }
        var pending = top.allocatedClusters().map(\.0.value)
        var done = 0
        var total = pending.count
        var passes = 0
        // Passes over what the top holds, then over what it allocated meanwhile, until that is
        // small; the rest is copied with I/O paused, and the stack switches.
        for pass in 0..<8 {
            passes += 1
            for c in pending {
                try stack.read { _ throws(DeviceError) in try locks.with(c) { () throws(DeviceError) in try copy(c) } }
                done += 1
                if done % 256 == 0 { try flushDelta(dest) }
                reportProgress(done, total, progress)
            }
            pending = m.dirtyClusters()
            if pending.count <= 16 || pass == 7 { break }
            total += pending.count
        }
        // What the pause will have to write out is flushed before it.
        try flushDelta(dest)
        let removed = try stack.write { s throws(DeviceError) -> [String] in
            let start = Host.monotonicNanoseconds()
            let last = m.dirtyClusters()
            for c in last { try copy(c) }
            try flushDelta(dest)
            try lifting { () throws(ImageError) in try top.close() }
            uninstall()
            let old = s.levels.removeLast()
            s.levels[l1].readOnly = false
            let report = MergeReport(
                passes: passes, copied: done, mirrored: m.mirrored.load(ordering: .relaxed), pausedClusters: last.count,
                pauseSeconds: Double(Host.monotonicNanoseconds() - start) / 1e9)
            control.withLock { $0.lastMerge = report }
            return [old.path]
        }
        reportProgress(total, total, progress)
        return removed
    }

    func reportProgress(_ done: Int, _ total: Int, _ progress: (@Sendable (Int, Int) -> Void)?) {
        control.withLock { $0.mergeProgress = MergeProgress(done: done, total: total) }
        progress?(done, total)
    }

    // MARK: - Grow

    /// PLOOP_IOC_GROW: grows the top delta (moving data clusters out of the BAT's way) and the
    /// device. I/O waits while the header switches; it is never refused.
    public func grow(toSectors sectors: UInt64) throws(DeviceError) {
        // The size comes from a client (the control socket, an ioctl): checked before any
        // arithmetic, so a huge value is refused instead of killing the running device.
        guard sectors <= PloopSpec.maxImageSectors else {
            throw .sizeTooLarge(sectors: sectors, limit: PloopSpec.maxImageSectors)
        }
        try maintenance(.grow) { () throws(DeviceError) in
            try stack.write { s throws(DeviceError) in
                let bytes = sectors * PloopSpec.sectorSize
                guard bytes >= s.sizeBytes else {
                    throw .cannotShrink(fromSectors: s.sizeBytes / 512, toSectors: sectors)
                }
                guard bytes > s.sizeBytes else { return }
                guard !s.top.readOnly else { throw .readOnly("device") }
                switch s.top.image {
                case .ploop1(let i):
                    try lifting { () throws(ImageError) in try i.grow(toSectors: sectors) }
                    s.sizeBytes = i.virtualBytes
                case .raw(let r):
                    let rounded = (bytes + UInt64(clusterBytes) - 1) / UInt64(clusterBytes) * UInt64(clusterBytes)
                    try lifting { () throws(ImageError) in
                        try r.file.truncate(to: rounded)
                        try r.file.sync()
                    }
                    s.levels[s.levels.count - 1].rawBytes = rounded
                    s.sizeBytes = rounded
                }
            }
        }
    }

    // MARK: - Sync

    /// PLOOP_IOC_SYNC: every acknowledged write durable, and the top's header up to date.
    public func sync() throws(DeviceError) {
        try flush()
        try stack.read { s throws(DeviceError) in
            guard s.running, !s.top.readOnly, case .ploop1(let i) = s.top.image else { return }
            try lifting { () throws(ImageError) in try i.refreshEmptyFlag() }
        }
    }
}

// MARK: - Kernel primitives for merges done by user space

extension DeviceModel {
    /// PLOOP_IOC_DEL_DELTA: level `l` leaves the running stack and the levels above it renumber.
    /// User space calls it after merging `l` into the level below offline, so that level is re-read
    /// from its file (BAT and size may have changed) and serves what `l` served. Level 0 and the
    /// writable top cannot leave a running stack.
    public func deleteDelta(level l: Int) throws(DeviceError) {
        try requireRunning()
        try control.withLock { c throws(DeviceError) in
            guard c.machine.state == .off else { throw .busy(c.machine.state) }
        }
        try stack.write { s throws(DeviceError) in
            guard l >= 1, l < s.levels.count - 1 else {
                throw .unsuitableLevel(.deleteDelta, level: l)
            }
            switch s.levels[l - 1].image {
            case .ploop1(let below):
                let fresh = try lifting { () throws(ImageError) in try Ploop1Image(file: below.file, writable: false) }
                s.levels[l - 1].image = .ploop1(fresh)
            case .raw(let r):
                s.levels[l - 1].rawBytes = try lifting { () throws(ImageError) in try r.virtualBytes() }
            }
            s.levels.remove(at: l)
        }
    }

    /// PLOOP_IOC_UPDATE_INDEX: points clusters of the read-only level `l` at new blocks in memory,
    /// after user space moved them in the file (an offline grow of a merge destination).
    public func updateIndex(level l: Int, maps: [IndexMap]) throws(DeviceError) {
        try requireRunning()
        try stack.write { s throws(DeviceError) in
            guard l >= 0, l < s.levels.count - 1, case .ploop1(let image) = s.levels[l].image else {
                throw .unsuitableLevel(.updateIndex, level: l)
            }
            let entries = UInt64(image.header.batEntries)
            for m in maps {
                guard UInt64(m.cluster) < entries, image.layout.canEncode(ImageBlock(m.block)) else {
                    throw .invalid("index update \(m.cluster) -> \(m.block) does not fit level \(l)")
                }
            }
            for m in maps { image.commit(cluster: ClusterIndex(UInt64(m.cluster)), block: ImageBlock(m.block)) }
        }
    }
}

/// The bookkeeping of a running merge of the top: which clusters are in the destination already
/// (writes to them are mirrored there) and which the top allocated after the copier passed them.
final class MergeMirror: Sendable {
    let dest: DeltaImage
    let clusterBytes: Int
    private struct State {
        var copied: [UInt64]
        var dirty: Set<UInt64> = []
    }
    private let state: Mutex<State>
    let mirrored = Atomic<Int>(0)

    init(dest: DeltaImage, clusterBytes: Int, clusters: UInt64) {
        self.dest = dest
        self.clusterBytes = clusterBytes
        state = Mutex(State(copied: [UInt64](repeating: 0, count: Int((clusters + 63) / 64))))
    }

    /// The copier is about to copy `c` (holding its cluster lock).
    func forget(_ c: UInt64) { _ = state.withLock { $0.dirty.remove(c) } }

    /// The copier has copied `c` into the destination (holding its cluster lock).
    func copied(_ c: UInt64) {
        state.withLock { s in
            let w = Int(c / 64)
            if w < s.copied.count { s.copied[w] |= 1 << (c % 64) }
        }
    }

    func dirtyClusters() -> [UInt64] { state.withLock { Array($0.dirty).sorted() } }

    /// A writer changed `src.count` bytes at `inOff` of cluster `c` in the top (holding the
    /// cluster lock): the same bytes go to the destination if `c` is there already, else `c` is
    /// remembered for the next pass.
    func wrote(_ c: UInt64, _ inOff: Int, _ src: UnsafeRawBufferPointer) throws(DeviceError) {
        let there = state.withLock { s -> Bool in
            let w = Int(c / 64)
            if w < s.copied.count, s.copied[w] & (1 << (c % 64)) != 0 { return true }
            s.dirty.insert(c)
            return false
        }
        guard there else { return }
        mirrored.add(1, ordering: .relaxed)
        switch dest {
        case .ploop1(let d):
            guard let b = d.block(of: ClusterIndex(c)) else { throw .invalid("merge: cluster \(c) was copied but has no block in the destination") }
            try lifting { () throws(ImageError) in try d.write(block: b, offset: inOff, data: src) }
        case .raw(let r):
            try lifting { () throws(ImageError) in try r.file.write(src, at: c * UInt64(clusterBytes) + UInt64(inOff)) }
        }
    }
}
