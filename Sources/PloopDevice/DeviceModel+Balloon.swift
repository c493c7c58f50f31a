import PloopFormat
import PloopImage

extension DeviceModel {
    func topPloop1() throws(DeviceError) -> (Ploop1Image, Int) {
        try stack.read { s throws(DeviceError) in
            guard s.running else { throw .notRunning("device") }
            guard case .ploop1(let i) = s.top.image, !s.top.readOnly else {
                throw .notSupported("balloon operations need a writable ploop1 top delta")
            }
            return (i, s.levels.count - 1)
        }
    }

    /// PLOOP_IOC_BALLOON.
    public func balloon(inflate: Bool, keepIntact: Bool) throws(DeviceError) -> BalloonReply {
        try requireRunning()
        if inflate && !keepIntact { _ = try topPloop1() }
        let (level, head) = stack.read { s -> (Int, UInt32) in
            if case .ploop1(let i) = s.top.image { return (s.levels.count - 1, i.allocHead) }
            return (s.levels.count - 1, 0)
        }
        return try control.withLock { c throws(DeviceError) -> BalloonReply in
            let state = try c.machine.balloon(inflate: inflate, keepIntact: keepIntact)
            let frozen = (state == .fbloaded || state == .reloc) ? c.frozenAllocHead : nil
            return BalloonReply(state: state, allocHead: frozen ?? head, level: level)
        }
    }

    /// PLOOP_IOC_FREEBLKS: loads blocks of the top delta that hold only balloon data; new clusters
    /// take them before appending. Returns the allocation head, frozen for RELOCBLKS.
    public func loadFreeBlocks(level: Int, extents: [FreeExtent]) throws(DeviceError) -> UInt32 {
        let (top, topLevel) = try topPloop1()
        guard level == topLevel else { throw .notTopLevel(.loadFreeBlocks, level: level, top: topLevel) }
        var pairs: [(cluster: UInt32, block: UInt32)] = []
        for e in extents {
            for i in 0..<e.length {
                guard top.block(of: ClusterIndex(UInt64(e.cluster + i))) == ImageBlock(e.block + i), e.block + i >= top.firstDataBlock else {
                    throw .invalid("free extent \(e.cluster)+\(e.length) → block \(e.block) does not match the top delta's BAT")
                }
                pairs.append((e.cluster + i, e.block + i))
            }
        }
        return try control.withLock { c throws(DeviceError) -> UInt32 in
            try c.machine.loadFreeBlocks()
            c.freeList = pairs.sorted { $0.block < $1.block }
            c.frozenAllocHead = top.allocHead
            return top.allocHead
        }
    }

    /// PLOOP_IOC_FBGET: the loaded free blocks, as extents contiguous in cluster and block.
    public func freeBlockList() -> [FreeExtent] {
        Self.coalesce(control.withLock { $0.freeList })
    }

    static func coalesce(_ pairs: [(cluster: UInt32, block: UInt32)]) -> [FreeExtent] { FreeExtent.coalescing(pairs) }

    /// PLOOP_IOC_FBFILTER: drops free extents shorter than `minLength` blocks.
    public func filterFreeBlocks(minLength: UInt32) throws(DeviceError) {
        try control.withLock { c throws(DeviceError) in
            guard c.machine.state == .fbloaded || c.machine.state == .discard else {
                throw .wrongState(.freeBlockList, c.machine.state)
            }
            let keep = Self.coalesce(c.freeList).filter { $0.length >= minLength }
            c.freeList = keep.flatMap { e in (0..<e.length).map { (e.cluster + $0, e.block + $0) } }
        }
    }

    /// PLOOP_IOC_FBDROP.
    public func dropFreeBlocks() throws(DeviceError) {
        try control.withLock { c throws(DeviceError) in
            try c.machine.dropFreeBlocks()
            c.freeList = []
            c.frozenAllocHead = nil
        }
    }

    /// PLOOP_IOC_RELOCBLKS: moves the listed tail blocks of the top delta into loaded free blocks
    /// (copy, sync, repoint, sync), then truncates the image after its last used block. Returns the
    /// number of clusters cut. Interrupted, the state stays RELOC and the same call finishes it.
    public func relocateBlocks(level: Int, allocHead: UInt32, extents: [RelocExtent]) throws(DeviceError) -> UInt32 {
        let (top, topLevel) = try topPloop1()
        guard level == topLevel else { throw .notTopLevel(.relocateBlocks, level: level, top: topLevel) }
        let frees = try control.withLock { c throws(DeviceError) -> [(cluster: UInt32, block: UInt32)] in
            guard c.machine.state == .fbloaded || c.machine.state == .reloc else {
                throw .wrongState(.relocateBlocks, c.machine.state)
            }
            guard c.frozenAllocHead == allocHead else {
                throw .invalid("allocation head \(allocHead) does not match the frozen one \(c.frozenAllocHead.map(String.init) ?? "none")")
            }
            try c.machine.startRelocation()
            return c.freeList
        }
        var moves: [(cluster: UInt32, block: UInt32)] = []
        for e in extents where !e.free {
            for i in 0..<e.length { moves.append((e.cluster + i, e.block + i)) }
        }
        let cut = try stack.write { _ throws(DeviceError) -> UInt32 in
            try relocate(top, moves: moves.sorted { $0.block > $1.block }, frees: frees)
        }
        control.withLock { c in
            c.machine.finishRelocation()
            c.freeList = []
            c.frozenAllocHead = nil
        }
        return cut
    }

    /// How much data one batch of the relocation moves between syncs (a cut re-copies at most
    /// this much).
    static let relocationBatchBytes = 256 << 20

    /// The relocation itself, with I/O paused (the caller holds the stack lock exclusively).
    func relocate(_ top: Ploop1Image, moves: [(cluster: UInt32, block: UInt32)], frees: [(cluster: UInt32, block: UInt32)]) throws(DeviceError) -> UInt32 {
        let oldHead = top.allocHead
        // A loaded free block is still free while its balloon cluster points at it, or, after a
        // relocation that failed part-way, while no entry points at it any more (the failed run
        // had let go of it, then could not fill it): each move below points the balloon cluster
        // at nothing again, durably, before writing into the block.
        let owners = top.owners()
        var free = frees.filter {
            top.block(of: ClusterIndex(UInt64($0.cluster))) == ImageBlock($0.block) || owners[$0.block] == nil
        }.sorted { $0.block < $1.block }
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: clusterBytes, alignment: 4096)
        defer { scratch.deallocate() }
        try lifting { () throws(ImageError) in
            try top.flush()
            // Each data block at the tail goes to the lowest free block below it.
            var plan: [(m: (cluster: UInt32, block: UInt32), f: (cluster: UInt32, block: UInt32))] = []
            for m in moves {
                guard let f = free.first, f.block < m.block else { break }
                // Only move what the BAT still says lives there.
                guard top.block(of: ClusterIndex(UInt64(m.cluster))) == ImageBlock(m.block) else { continue }
                free.removeFirst()
                plan.append((m, f))
            }
            // In batches, three steps each made durable before the next: the balloon's entries
            // let go of their free blocks, the data moves into them, the clusters are repointed.
            // At no moment do two entries share a block, and a cut at any point leaves every
            // cluster on a block that holds its data (old or new); the syncs are per batch, not
            // per cluster.
            let batch = max(1, Self.relocationBatchBytes / clusterBytes)
            for start in stride(from: 0, to: plan.count, by: batch) {
                let part = plan[start..<min(start + batch, plan.count)]
                for p in part { try top.setEntry(ClusterIndex(UInt64(p.f.cluster)), to: nil) }
                try top.file.sync()
                for p in part {
                    try top.file.copy(from: top.file, at: top.blockOffset(ImageBlock(p.m.block)), to: top.blockOffset(ImageBlock(p.f.block)), length: clusterBytes, scratch: scratch)
                }
                try top.file.sync()
                for p in part { try top.setEntry(ClusterIndex(UInt64(p.m.cluster)), to: ImageBlock(p.f.block)) }
                try top.file.sync()
            }
            // Free blocks left past the last block holding real data are let go, then cut off.
            let balloon = Set(free.map(\.cluster))
            var end = top.firstDataBlock
            for (c, b) in top.allocatedClusters() where !balloon.contains(UInt32(c.value)) { end = max(end, b.value + 1) }
            for f in free where f.block >= end { try top.setEntry(ClusterIndex(UInt64(f.cluster)), to: nil) }
            try top.file.sync()
            if end < oldHead { try top.truncate(toBlocks: end) }
        }
        let newHead = top.allocHead
        return oldHead > newHead ? oldHead - newHead : 0
    }
}
