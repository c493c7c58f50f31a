import PloopFormat
import PloopImage
import Synchronization

/// One delta of a running stack.
public enum DeltaImage: Sendable {
    case ploop1(Ploop1Image)
    case raw(RawImage)

    var file: any BlockFile {
        switch self {
        case .ploop1(let i): i.file
        case .raw(let r): r.file
        }
    }

    var format: ImageFormat {
        switch self {
        case .ploop1: .ploop1
        case .raw: .raw
        }
    }
}

struct Level: Sendable {
    var path: String
    var image: DeltaImage
    var readOnly: Bool
    /// The file opened (and locked) when the level joined the stack; kept open so the lock holds
    /// while other instances of the file come and go (merge reopens a level for writing).
    var lockedFile: (any BlockFile)?
    /// For a raw delta: the bytes it holds (clusters past it read from below, i.e. zeros).
    var rawBytes: UInt64 = 0
}

struct Stack: Sendable {
    var levels: [Level]
    var sizeBytes: UInt64
    var running = true
    var top: Level { levels[levels.count - 1] }
}

/// The model of the kernel ploop device: a delta stack, lookups top-down, copy-up on partial writes
/// to clusters the top lacks, data before index, and the maintenance operations (snapshot, online
/// merge, online grow, balloon free blocks and relocation, dirty tracking) with the kernel's state
/// machine. The simulator serves it over FUSE; `InProcessBackend` calls it directly.
///
/// Locking: I/O holds the stack lock shared and one cluster lock at a time; nothing global is
/// held across file I/O on the data path. Stack changes take the stack lock exclusively.
public final class DeviceModel: Sendable {
    public let clusterBytes: Int
    let opener: any ImageOpener
    let callerOwnsInUse: Bool
    let stack: StackLock<Stack>
    let locks = ClusterLocks()
    let watch = WriteWatch()
    let control = Mutex(Control())
    /// Set while an online merge of the top runs (changed only under the exclusive stack lock, so
    /// a writer holding it shared sees one value throughout): writes then take the cluster lock and
    /// tell `mirror` about each cluster they touch.
    let merging = Atomic<Bool>(false)
    let mirror = Mutex<MergeMirror?>(nil)

    struct Control {
        var machine = MaintenanceMachine()
        var freeList: [(cluster: UInt32, block: UInt32)] = []
        var frozenAllocHead: UInt32?
        var mergeProgress: MergeProgress?
        var lastMerge: MergeReport?
    }

    // MARK: - Start and stop

    /// Opens the images (base first) and starts the device. Every header is validated before the
    /// top is opened for writing, so a refused start leaves every file as it was.
    ///
    /// With `request.callerOwnsInUse` the in-use mark is the caller's (dm-ploop): a marked top is
    /// accepted, and the model neither sets nor clears the mark.
    public init(_ request: MountRequest, opener: any ImageOpener = PosixOpener(locking: false)) throws(DeviceError) {
        self.opener = opener
        let callerOwnsInUse = request.callerOwnsInUse ?? false
        self.callerOwnsInUse = callerOwnsInUse
        let (probes, clusterSectors) = try request.probe(oneVersion: false, allowInUse: callerOwnsInUse) { (path, writable) throws(ImageError) in
            try opener.open(path, writable: writable, lock: true)
        }
        let cb = Int(clusterSectors) * 512
        self.clusterBytes = cb
        var levels: [Level] = []
        let topIndex = probes.count - 1
        for (i, p) in probes.enumerated() {
            let (path, file) = (p.path, p.file)
            let writable = i == topIndex && !request.readOnly
            let f: any BlockFile = writable ? TrackingBlockFile(file, watch: watch) : file
            switch p.format {
            case .raw:
                let bytes = try lifting { () throws(ImageError) in try RawImage(file: f, clusterBytes: cb).virtualBytes() }
                levels.append(Level(path: path, image: .raw(RawImage(file: f, clusterBytes: cb)), readOnly: !writable, lockedFile: file, rawBytes: bytes))
            case .ploop1:
                let image = try lifting { () throws(ImageError) in
                    try Ploop1Image(file: f, writable: writable, allowDirty: callerOwnsInUse, markInUse: !callerOwnsInUse)
                }
                levels.append(Level(path: path, image: .ploop1(image), readOnly: !writable, lockedFile: file))
            }
        }
        let size: UInt64 =
            switch levels[topIndex].image {
            case .ploop1(let i): i.virtualBytes
            case .raw: levels[topIndex].rawBytes
            }
        stack = StackLock(Stack(levels: levels, sizeBytes: size))
    }

    /// Flushes and clears the in-use mark of the top: the images are clean when this returns.
    /// Refused while a maintenance operation is in progress.
    public func stop() throws(DeviceError) {
        try control.withLock { c throws(DeviceError) in
            guard c.machine.state == .off else { throw .busy(c.machine.state) }
        }
        try stack.write { s throws(DeviceError) in
            guard s.running else { return }
            let top = s.top
            if !top.readOnly {
                switch top.image {
                case .ploop1(let i): try lifting { () throws(ImageError) in callerOwnsInUse ? try i.flush() : try i.close() }
                case .raw(let r): try lifting { () throws(ImageError) in try r.file.sync() }
                }
            }
            s.running = false
            // Close every file now (and with them their locks), not when the model goes away.
            s.levels = []
        }
    }

    public var sizeBytes: UInt64 { stack.read { $0.sizeBytes } }
    /// The last online merge of the top this device ran, if any.
    public var lastMergeReport: MergeReport? { control.withLock { $0.lastMerge } }
    public var state: MaintenanceState { control.withLock { $0.machine.state } }

    public func info(device: String, backend: String) -> DeviceInfo {
        let (levels, size, running) = stack.read { s in
            (s.levels.enumerated().map { LevelInfo(level: $0.offset, path: $0.element.path, format: $0.element.image.format, readOnly: $0.element.readOnly) },
             s.sizeBytes, s.running)
        }
        let (state, progress) = control.withLock { ($0.machine.state, $0.mergeProgress) }
        return DeviceInfo(
            device: device, backend: backend, sizeBytes: size, clusterBytes: clusterBytes, state: state,
            running: running, levels: levels, mergeProgress: progress)
    }

    /// The image paths, base first.
    public var imagePaths: [String] { stack.read { $0.levels.map(\.path) } }

    public var isRunning: Bool { stack.read { $0.running } }

    // MARK: - Data path

    /// Calls `body` for each piece of [offset, offset+length) that falls in one cluster.
    @inline(__always)
    func pieces(_ offset: UInt64, _ length: Int, _ body: (UInt64, Int, Int, Int) throws(DeviceError) -> Void) throws(DeviceError) {
        let cb = UInt64(clusterBytes)
        var done = 0
        while done < length {
            let pos = offset + UInt64(done)
            let cluster = pos / cb
            let inOffset = Int(pos % cb)
            let n = min(clusterBytes - inOffset, length - done)
            try body(cluster, inOffset, done, n)
            done += n
        }
    }

    func checkRange(_ s: Stack, _ offset: UInt64, _ length: Int) throws(DeviceError) {
        guard s.running else { throw .notRunning("device") }
        guard offset <= s.sizeBytes, UInt64(length) <= s.sizeBytes - offset else {
            throw .outOfRange(offset: offset, length: length, size: s.sizeBytes)
        }
    }

    /// Reads device bytes: each cluster from the top-most delta that has it, zeros where none does.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        try stack.read { s throws(DeviceError) in
            try checkRange(s, offset, buffer.count)
            try pieces(offset, buffer.count) { c, inOff, bufOff, n throws(DeviceError) in
                // No cluster lock: blocks only move with the stack lock held exclusively, and a
                // cluster being allocated reads from below until its entry is committed.
                let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[bufOff..<bufOff + n])
                try readPiece(s.levels, below: s.levels.count, c, inOff, dst)
            }
        }
    }

    /// For readers that can hand a file range to the kernel (the FUSE server splices it): when
    /// [offset, offset+length) lies in one cluster that the top-most level holding it stores in a
    /// file with a descriptor, calls `body` with that descriptor and position while the stack
    /// cannot change (blocks move only under the exclusive lock) and returns true. Otherwise
    /// returns false and the caller reads normally (holes, ranges across clusters).
    public func withDirectSource(at offset: UInt64, length: Int, _ body: (Int32, UInt64) -> Void) throws(DeviceError) -> Bool {
        try stack.read { s throws(DeviceError) -> Bool in
            try checkRange(s, offset, length)
            guard let (fd, at) = storedRange(s, offset, length, { $0.descriptor(forReadingAt: $1, length: length) }) else { return false }
            body(fd, at)
            return true
        }
    }

    /// Where device bytes [offset, offset+length) are stored when they lie in one cluster that the
    /// top-most level holding it keeps in a file: the descriptor `descriptor` picks for the file
    /// and position, and that position. Nil for holes, ranges across clusters, past a raw level's
    /// end, or where `descriptor` has none. Holding the stack lock.
    func storedRange(_ s: Stack, _ offset: UInt64, _ length: Int, _ descriptor: (any BlockFile, UInt64) -> Int32?) -> (Int32, UInt64)? {
        let cb = UInt64(clusterBytes)
        let c = offset / cb
        let inOff = offset % cb
        guard inOff + UInt64(length) <= cb else { return nil }
        switch holder(s.levels, below: s.levels.count, c) {
        case .ploop1(let img, let b):
            let at = img.blockOffset(b) + inOff
            return descriptor(img.file, at).map { ($0, at) }
        case .raw(let r, let bytes):
            guard offset + UInt64(length) <= bytes else { return nil }
            return descriptor(r.file, offset).map { ($0, offset) }
        case nil:
            return nil
        }
    }

    /// Asynchronous I/O for a server that submits it itself (the FUSE server, with Linux AIO): when
    /// [offset, offset+length) lies in one cluster stored at a place its file takes `O_DIRECT`
    /// I/O (for a write: a cluster the ploop1 top already holds, no merge of the top running),
    /// pins the stack and calls `submit` with the descriptor, the position and a token. `submit`
    /// returns true once the I/O is on its way; then `finishDirect` must follow, exactly once,
    /// when it has completed (before it is acknowledged). Returns false, nothing pinned, when the
    /// request needs the synchronous path (holes, copy-up, allocation, a merge, unaligned ranges,
    /// buffered images) or `submit` declined.
    public func startDirect(write: Bool, at offset: UInt64, length: Int, _ submit: (Int32, UInt64, UnsafeMutableRawPointer?) -> Bool) throws(DeviceError) -> Bool {
        try stack.read { s throws(DeviceError) -> Bool in
            try checkRange(s, offset, length)
            let cb = UInt64(clusterBytes)
            let c = offset / cb
            let inOff = offset % cb
            guard length > 0, inOff + UInt64(length) <= cb else { return false }
            let fd: Int32, at: UInt64
            var written: Ploop1Image?
            if write {
                guard !s.top.readOnly else { throw .readOnly("device") }
                // During a merge of the top every write goes through the mirror (synchronously).
                guard !merging.load(ordering: .relaxed), case .ploop1(let img) = s.top.image,
                      let b = img.block(of: ClusterIndex(c)) else { return false }
                at = img.blockOffset(b) + inOff
                guard let d = img.file.directDescriptor(at: at, length: length) else { return false }
                fd = d
                written = img
            } else {
                guard let place = storedRange(s, offset, length, { $0.directDescriptor(at: $1, length: length) }) else { return false }
                (fd, at) = place
            }
            // The token keeps the written image alive and says where to note the data.
            let token = written.map { Unmanaged.passRetained($0).toOpaque() }
            stack.pin()
            if submit(fd, at, token) { return true }
            stack.unpin()
            if let token { Unmanaged<Ploop1Image>.fromOpaque(token).release() }
            return false
        }
    }

    /// Ends I/O `startDirect` submitted, from the thread that saw it complete: a write is noted
    /// for the next flush and for dirty tracking (as `write` does for its own), then the stack is
    /// unpinned. Takes no stack lock (a stack change may be waiting for this very pin).
    public func finishDirect(token: UnsafeMutableRawPointer?, position: UInt64, length: Int) {
        if let token {
            let img = Unmanaged<Ploop1Image>.fromOpaque(token).takeRetainedValue()
            img.dataWrittenDirectly()
            watch.record(position, UInt64(length))
        }
        stack.unpin()
    }

    /// Where a cluster's current bytes are: the top-most of some levels holding it.
    enum Holder {
        case ploop1(Ploop1Image, ImageBlock)
        /// A raw level, with the bytes it holds.
        case raw(RawImage, bytes: UInt64)
    }

    /// The top-most of `levels[0..<below]` that holds cluster `c`, or nil if none does.
    @inline(__always)
    func holder(_ levels: [Level], below: Int, _ c: UInt64) -> Holder? {
        for i in stride(from: below - 1, through: 0, by: -1) {
            switch levels[i].image {
            case .ploop1(let img):
                if let b = img.block(of: ClusterIndex(c)) { return .ploop1(img, b) }
            case .raw(let r):
                if c * UInt64(clusterBytes) < levels[i].rawBytes { return .raw(r, bytes: levels[i].rawBytes) }
            }
        }
        return nil
    }

    /// Reads a piece of cluster `c` from the top-most of `levels[0..<below]` that has it.
    func readPiece(_ levels: [Level], below: Int, _ c: UInt64, _ inOff: Int, _ dst: UnsafeMutableRawBufferPointer) throws(DeviceError) {
        switch holder(levels, below: below, c) {
        case .ploop1(let img, let b):
            try lifting { () throws(ImageError) in try img.read(block: b, offset: inOff, into: dst) }
        case .raw(let r, let bytes):
            // A raw level is only ever the base: past its end there is nothing but zeros.
            let at = c * UInt64(clusterBytes) + UInt64(inOff)
            let n = at < bytes ? try lifting { () throws(ImageError) in try r.file.read(into: dst, at: at) } : 0
            if n < dst.count { dst[n...].initializeMemory(as: UInt8.self, repeating: 0) }
        case nil:
            dst.initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// True if some level below `below` holds cluster `c`.
    func lowerHas(_ levels: [Level], below: Int, _ c: UInt64) -> Bool {
        holder(levels, below: below, c) != nil
    }

    /// Writes device bytes into the top delta, allocating (and copying up from below) on the first
    /// write to a cluster the top lacks.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        try stack.read { s throws(DeviceError) in
            try checkRange(s, offset, buffer.count)
            guard !s.top.readOnly else { throw .readOnly("device") }
            let m = activeMerge()
            try pieces(offset, buffer.count) { c, inOff, bufOff, n throws(DeviceError) in
                let src = UnsafeRawBufferPointer(rebasing: buffer[bufOff..<bufOff + n])
                if let m {
                    // A merge of the top runs: under the cluster lock, so the copier never reads
                    // the cluster half written, and into the merge's destination too once the
                    // cluster has been copied there.
                    try locks.with(c) { () throws(DeviceError) in
                        if try !writeInPlace(s.levels, c, inOff, src) { try writePiece(s.levels, c, inOff, src) }
                        try m.wrote(c, inOff, src)
                    }
                } else if try !writeInPlace(s.levels, c, inOff, src) {
                    // Fast path above: a cluster the top already has is written in place without
                    // a cluster lock. Allocation (and copy-up) takes the lock and looks again.
                    try locks.with(c) { () throws(DeviceError) in try writePiece(s.levels, c, inOff, src) }
                }
            }
        }
    }

    /// The running merge of the top, if any; called holding the stack lock shared.
    @inline(__always)
    func activeMerge() -> MergeMirror? {
        merging.load(ordering: .relaxed) ? mirror.withLock { $0 } : nil
    }

    /// Zeros for a piece of a cluster the top holds: the 4 KiB pages inside it become a hole of the
    /// image file (their space goes back to the host), the ragged edges are written. Holding the
    /// cluster lock.
    func punchInPlace(_ levels: [Level], _ c: UInt64, _ inOff: Int, _ n: Int, zeros: UnsafeRawBufferPointer) throws(DeviceError) -> Bool {
        guard case .ploop1(let img) = levels[levels.count - 1].image, let b = img.block(of: ClusterIndex(c)) else { return false }
        let page = 4096
        let first = (inOff + page - 1) / page * page
        let last = (inOff + n) / page * page
        try lifting { () throws(ImageError) in
            if first < last {
                if first > inOff { try img.write(block: b, offset: inOff, data: UnsafeRawBufferPointer(rebasing: zeros[0..<first - inOff])) }
                try img.punch(block: b, offset: first, length: last - first)
                if inOff + n > last { try img.write(block: b, offset: last, data: UnsafeRawBufferPointer(rebasing: zeros[0..<inOff + n - last])) }
            } else {
                try img.write(block: b, offset: inOff, data: UnsafeRawBufferPointer(rebasing: zeros[0..<n]))
            }
        }
        return true
    }

    /// Writes into a cluster the ploop1 top already holds; false if it does not.
    @inline(__always)
    func writeInPlace(_ levels: [Level], _ c: UInt64, _ inOff: Int, _ src: UnsafeRawBufferPointer) throws(DeviceError) -> Bool {
        guard case .ploop1(let img) = levels[levels.count - 1].image, let b = img.block(of: ClusterIndex(c)) else { return false }
        try lifting { () throws(ImageError) in try img.write(block: b, offset: inOff, data: src) }
        return true
    }

    func writePiece(_ levels: [Level], _ c: UInt64, _ inOff: Int, _ src: UnsafeRawBufferPointer) throws(DeviceError) {
        let top = levels[levels.count - 1]
        switch top.image {
        case .raw(let r):
            try lifting { () throws(ImageError) in try r.file.write(src, at: c * UInt64(clusterBytes) + UInt64(inOff)) }
        case .ploop1(let img):
            if let b = img.block(of: ClusterIndex(c)) {
                try lifting { () throws(ImageError) in try img.write(block: b, offset: inOff, data: src) }
            } else {
                let (b, reused) = try allocate(img, for: c)
                if src.count == clusterBytes {
                    try lifting { () throws(ImageError) in try img.write(block: b, offset: 0, data: src) }
                } else if reused || lowerHas(levels, below: levels.count - 1, c) {
                    // Copy-up: the whole cluster, from below (or zeros over a reused block).
                    let whole = UnsafeMutableRawBufferPointer.allocate(byteCount: clusterBytes, alignment: 4096)
                    defer { whole.deallocate() }
                    try readPiece(levels, below: levels.count - 1, c, 0, whole)
                    UnsafeMutableRawBufferPointer(rebasing: whole[inOff..<inOff + src.count]).copyMemory(from: src)
                    try lifting { () throws(ImageError) in try img.write(block: b, offset: 0, data: UnsafeRawBufferPointer(whole)) }
                } else {
                    try lifting { () throws(ImageError) in
                        try img.preallocate(block: b)
                        try img.write(block: b, offset: inOff, data: src)
                    }
                }
                img.commit(cluster: ClusterIndex(c), block: b)
            }
        }
    }

    /// A block for new data: a loaded free block (balloon) whose owner can be locked, else the
    /// allocation head.
    func allocate(_ img: Ploop1Image, for c: UInt64) throws(DeviceError) -> (ImageBlock, Bool) {
        while let f = control.withLock({ c in c.freeList.isEmpty ? nil : c.freeList.removeFirst() }) {
            // The free block still belongs to a balloon cluster: zero that entry first (durably), as
            // the kernel does, so no two entries ever share the block.
            let reused = try locks.withIfAvailable(UInt64(f.cluster), alsoHolding: c) { () throws(DeviceError) -> Bool in
                guard img.block(of: ClusterIndex(UInt64(f.cluster))) == ImageBlock(f.block) else { return false }
                try lifting { () throws(ImageError) in
                    try img.setEntry(ClusterIndex(UInt64(f.cluster)), to: nil)
                    try img.file.sync()
                }
                return true
            }
            if reused == true { return (ImageBlock(f.block), true) }
            if reused == nil {
                // Its owner is busy right now: keep the block for later, append this time.
                control.withLock { $0.freeList.append(f) }
                break
            }
        }
        return (try lifting { () throws(ImageError) in try img.reserveBlock() }, false)
    }

    /// Zeros device bytes (discard / write-zeroes): clusters that already read as zeros are skipped.
    public func writeZeroes(at offset: UInt64, length: UInt64) throws(DeviceError) {
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: clusterBytes, alignment: 4096)
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        defer { zeros.deallocate() }
        try stack.read { s throws(DeviceError) in
            try checkRange(s, offset, 0)
            guard offset + length <= s.sizeBytes else { throw .outOfRange(offset: offset, length: Int(length), size: s.sizeBytes) }
            guard !s.top.readOnly else { throw .readOnly("device") }
            let m = activeMerge()
            var done: UInt64 = 0
            while done < length {
                let n = Int(min(UInt64(clusterBytes) - (offset + done) % UInt64(clusterBytes), length - done))
                let c = (offset + done) / UInt64(clusterBytes)
                let inOff = Int((offset + done) % UInt64(clusterBytes))
                try locks.with(c) { () throws(DeviceError) in
                    let piece = UnsafeRawBufferPointer(rebasing: zeros[0..<n])
                    if try punchInPlace(s.levels, c, inOff, n, zeros: UnsafeRawBufferPointer(zeros)) {
                        try m?.wrote(c, inOff, piece)
                    } else if lowerHas(s.levels, below: s.levels.count, c) {
                        try writePiece(s.levels, c, inOff, piece)
                        try m?.wrote(c, inOff, piece)
                    }
                }
                done += UInt64(n)
            }
        }
    }

    /// Makes every acknowledged write durable (data, then BAT).
    public func flush() throws(DeviceError) {
        try stack.read { s throws(DeviceError) in
            guard s.running, !s.top.readOnly else { return }
            switch s.top.image {
            case .ploop1(let i): try lifting { () throws(ImageError) in try i.flush() }
            case .raw(let r): try lifting { () throws(ImageError) in try r.file.sync() }
            }
        }
    }
}

extension ClusterLocks {
    /// Runs `body` under the lock of `cluster` if it can be had without waiting; the stripe of
    /// `held` (already locked by the caller) counts as had. Returns nil if it was busy.
    func withIfAvailable<T, E: Error>(_ cluster: UInt64, alsoHolding held: UInt64, _ body: () throws(E) -> T) throws(E) -> T? {
        if sameStripe(cluster, held) { return try body() }
        return try tryWith(cluster, body)
    }
}
