import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopSystem

/// The balloon procedures of the manual's section 9, written once against `DeviceBackend`: inflate
/// a hidden file in the file system, find the image blocks under it, load them as free blocks,
/// relocate the image's tail into them and cut the image. They never ask which backend runs.
///
/// On stock kernels ext4 has no `balloon_ino`: the balloon is a root-only hidden file at the file
/// system root, `/.balloon-c3a5ae3d-ce7f-43c4-a1ea-c61e2b4504e8` (the original's name), created on
/// first use; where the kernel mounts with `balloon_ino=N`, the file with that name is the same one.
public struct BalloonProcedure: Sendable {
    public let backend: any DeviceBackend
    public let device: String
    public let mountPoint: String
    /// Where the mounted file system starts on the device, in bytes (0: on the whole device).
    public var partitionOffset: UInt64 = 0
    /// Called with a line for the user at each step.
    public let say: @Sendable (String) -> Void
    /// Test hook: stop (as if killed) right after the named step.
    public let stopAfter: String?
    /// The relocation's progress (step, blocks done, blocks to move). The device moves them in
    /// one request (RELOCBLKS), so it is reported when the request starts and when it ends.
    public var progress: (@Sendable (String, Int, Int) -> Void)?

    public init(backend: any DeviceBackend, device: String, mountPoint: String, say: @escaping @Sendable (String) -> Void = { _ in }) {
        self.backend = backend
        self.device = device
        self.mountPoint = mountPoint
        self.say = say
        self.stopAfter = ProcessInfo.processInfo.environment["PLOOP_TEST_BALLOON_STOP_AFTER"]
    }

    public enum Failure: Error, CustomStringConvertible, Equatable {
        case inUse(String)
        case noSpace(requested: UInt64, available: UInt64)
        case protocolError(String)
        case fallocate(String)
        case corrupt(String)

        public var description: String {
            switch self {
            case .inUse(let p): "hidden balloon \(p) is in use by someone else (another balloon operation?)"
            case .noSpace(let r, let a):
                "the balloon cannot grow by \(SizeArgument.describe(bytes: r)): the file system has \(SizeArgument.describe(bytes: a)) free; nothing was changed"
            case .protocolError(let s): s
            case .fallocate(let s): "cannot inflate the balloon: \(s); the balloon was left as it was"
            case .corrupt(let s): "image corrupted: \(s)"
            }
        }
    }

    public struct Result: Sendable, Codable, Equatable {
        public var oldSize: UInt64
        public var newSize: UInt64
        public var freeBlocks: Int
        public var relocated: Int
        public var clustersCut: UInt32
        public var bytesCut: UInt64
    }

    var balloonPath: String { mountPoint + "/" + PloopSpec.balloonFileName }

    /// Opens (creating) the balloon file and locks it.
    func openBalloon() throws -> File {
        let f = try File(path: balloonPath, mode: .createOrOpen, permissions: 0o600)
        guard try f.tryLock(.exclusive) else { throw Failure.inUse(balloonPath) }
        return f
    }

    func checkpoint(_ step: String) {
        if stopAfter == step {
            say("test hook: stopping after \(step)")
            // As if killed: no cleanup, no state reset.
            Host.exitImmediately(9)
        }
    }

    /// The current balloon size (`show`).
    public func size() throws -> UInt64 {
        guard FileManager.default.fileExists(atPath: balloonPath) else { return 0 }
        return try File(path: balloonPath, mode: .readOnly).size()
    }

    /// `ploop balloon change -s SIZE`.
    public func change(to requested: UInt64) throws -> Result {
        let balloon = try openBalloon()
        let st = try balloon.stat()
        let block = UInt64(max(st.st_blksize, 4096))
        let old = UInt64(st.st_size)
        let new = (requested + block - 1) / block * block
        say("Changing balloon size old_size=\(old) new_size=\(new)")
        var result = Result(oldSize: old, newSize: new, freeBlocks: 0, relocated: 0, clustersCut: 0, bytesCut: 0)
        let inflate = old < new
        if !backend.balloonIoctls {
            try resizeFile(balloon, from: old, to: new)
            say("The device has no balloon ioctls (dm-ploop): the image keeps the clusters under the balloon until a discard gives them back (fstrim on the mount point)")
            return result
        }
        let reply = try backend.balloon(device, inflate: inflate, keepIntact: false)
        // From here the state is dropped on the way out, unless a relocation is pending.
        var resetState = true
        defer { if resetState { _ = try? backend.balloon(device, inflate: false, keepIntact: false) } }
        if !inflate {
            switch reply.state {
            case .fbloaded, .reloc:
                resetState = false
                throw Failure.protocolError("can't truncate the hidden balloon before the previous balloon operation (\(reply.state)) is completed: use 'ploop balloon complete'")
            case .balloon:
                throw Failure.protocolError("a BALLOON state is set by someone else: use 'ploop balloon clear' if no balloon operation runs")
            default: break
            }
            try resizeFile(balloon, from: old, to: new)
            return result
        }
        switch reply.state {
        case .balloon: break
        case .fbloaded, .reloc:
            resetState = false
            throw DeviceError.busy(reply.state)
        default:
            throw DeviceError.busy(reply.state)
        }
        try resizeFile(balloon, from: old, to: new)
        checkpoint("inflate")
        try reclaim(balloon, from: old, to: new, result: &result, resetState: &resetState)
        return result
    }

    /// The balloon file alone grown (allocated, refused without the free space) or cut, synced:
    /// what `change` is on dm-ploop, as the original's 9.x does it.
    func resizeFile(_ balloon: File, from old: UInt64, to new: UInt64) throws {
        if new <= old {
            if new == old { say("Nothing to do: new_size == old_size"); return }
            try balloon.truncate(to: new)
            try balloon.sync()
            say("Successfully truncated balloon from \(old) to \(new) bytes")
            return
        }
        // Enough free space, or nothing changes.
        if let available = try? MountedFileSystem(mountPoint).space().bytesAvailable, new - old > available {
            throw Failure.noSpace(requested: new - old, available: available)
        }
        do {
            try balloon.allocateStrict(length: new)
            try balloon.sync()
        } catch {
            try? balloon.truncate(to: old)
            throw Failure.fallocate(error.description)
        }
        guard try balloon.size() >= new else {
            try? balloon.truncate(to: old)
            throw Failure.fallocate("the file system gave less than asked")
        }
        say("Successfully inflated balloon from \(old) to \(new) bytes")
    }

    /// `check` (report) and `repair` (reclaim) the blocks under the whole balloon.
    public func checkAndRepair(repair: Bool) throws -> Result {
        let balloon = try openBalloon()
        let size = try balloon.size()
        var result = Result(oldSize: size, newSize: size, freeBlocks: 0, relocated: 0, clustersCut: 0, bytesCut: 0)
        if size == 0 {
            say("Nothing to do: hidden balloon is empty")
            return result
        }
        let reply = try backend.balloon(device, inflate: true, keepIntact: false)
        var resetState = true
        defer { if resetState { _ = try? backend.balloon(device, inflate: false, keepIntact: false) } }
        guard reply.state == .balloon else {
            resetState = reply.state != .fbloaded && reply.state != .reloc
            throw DeviceError.busy(reply.state)
        }
        if !repair {
            let (extents, _) = try freeExtents(balloon, from: 0, to: size)
            result.freeBlocks = extents.reduce(0) { $0 + Int($1.length) }
            say(result.freeBlocks == 0 ? "No free blocks found" : "Found \(result.freeBlocks) free blocks. Consider using 'ploop balloon repair'")
            return result
        }
        try reclaim(balloon, from: 0, to: size, result: &result, resetState: &resetState)
        return result
    }

    /// `complete`: finishes a relocation interrupted after its free blocks were loaded.
    public func complete() throws -> Result {
        var result = Result(oldSize: 0, newSize: 0, freeBlocks: 0, relocated: 0, clustersCut: 0, bytesCut: 0)
        let reply = try backend.balloon(device, inflate: false, keepIntact: true)
        switch reply.state {
        case .fbloaded, .reloc:
            say("Completing an interrupted \(reply.state) of \(device)")
            let free = try backend.freeBlockList(device)
            result.freeBlocks = free.reduce(0) { $0 + Int($1.length) }
            try relocate(free: free, allocHead: reply.allocHead, level: reply.level, result: &result)
        default:
            say("Nothing to complete: kernel is in \"\(reply.state)\" state")
        }
        return result
    }

    // MARK: - Steps

    /// FIEMAP → whole device clusters → top-delta blocks → FREEBLKS → relocation → cut.
    @discardableResult
    func reclaim(_ balloon: File, from: UInt64, to: UInt64, result: inout Result, resetState: inout Bool) throws -> Int {
        let (extents, level) = try freeExtents(balloon, from: from, to: to)
        result.freeBlocks = extents.reduce(0) { $0 + Int($1.length) }
        if extents.isEmpty {
            say("No unused cluster blocks found: the balloon covers only clusters the image never stored; nothing to relocate")
            return 0
        }
        let head = try backend.loadFreeBlocks(device, level: level, extents: extents)
        resetState = false  // FBLOADED: only RELOCBLKS (or 'complete') moves on from here
        say("Loaded \(result.freeBlocks) free blocks; allocation head \(head)")
        checkpoint("fbload")
        try relocate(free: extents, allocHead: head, level: level, result: &result)
        resetState = true
        return result.freeBlocks
    }

    /// RELOCBLKS for the tail blocks that the free blocks can take.
    func relocate(free: [FreeExtent], allocHead: UInt32, level: Int, result: inout Result) throws {
        let info = try backend.info(device)
        guard level < info.levels.count else { throw Failure.corrupt("level \(level) is not in the stack") }
        let image = try Ploop1Image(file: try ImagePath.open(info.levels[level].path, write: false), writable: false)
        let nFree = UInt32(free.reduce(0) { $0 + Int($1.length) })
        let freeBlocks = Set(free.flatMap { e in (0..<e.length).map { e.block + $0 } })
        let owners = image.owners()
        let first = allocHead > nFree ? allocHead - nFree : image.firstDataBlock
        var extents: [RelocExtent] = []
        for b in max(first, image.firstDataBlock)..<allocHead {
            if freeBlocks.contains(b) {
                extents.append(RelocExtent(cluster: 0, block: b, length: 1, free: true))
            } else if let c = owners[b] {
                extents.append(RelocExtent(cluster: UInt32(c.value), block: b, length: 1, free: false))
            }
        }
        result.relocated = extents.filter { !$0.free }.count
        say("Relocating \(result.relocated) tail blocks into free blocks")
        progress?("relocating", 0, result.relocated)
        let cut = try backend.relocateBlocks(device, level: level, allocHead: allocHead, extents: extents)
        progress?("relocating", result.relocated, result.relocated)
        result.clustersCut = cut
        result.bytesCut = UInt64(cut) * UInt64(info.clusterBytes)
        say("TRUNCATED: \(cut) cluster-blocks (\(result.bytesCut) bytes)")
    }

    /// The balloon's extents in [from, to), as whole device clusters that the top delta stores.
    func freeExtents(_ balloon: File, from: UInt64, to: UInt64) throws -> ([FreeExtent], Int) {
        // The BAT on disk must be current: push the file system and the device first.
        try balloon.syncFileSystem()
        try backend.sync(device)
        let info = try backend.info(device)
        let level = info.levels.count - 1
        guard info.levels[level].format == .ploop1 else { throw DeviceError.notSupported("the top delta is raw") }
        let cb = UInt64(info.clusterBytes)
        let image = try Ploop1Image(file: try ImagePath.open(info.levels[level].path, write: false), writable: false)
        var clusters: [UInt64] = []
        for e in try balloon.physicalExtents() {
            let lo = max(e.logical, from), hi = min(e.logical + e.length, to)
            guard lo < hi else { continue }
            // File-system byte offsets are partition offsets: the partition's start makes them
            // device offsets.
            let start = e.physical + (lo - e.logical) + partitionOffset
            let first = (start + cb - 1) / cb
            let end = (start + (hi - lo)) / cb
            if first < end { clusters.append(contentsOf: first..<end) }
        }
        var pairs: [(UInt32, UInt32)] = []
        for c in Set(clusters).sorted() {
            guard let b = image.block(of: ClusterIndex(c)) else { continue }
            guard b.value >= image.firstDataBlock, b.value < image.allocHead else {
                throw Failure.corrupt("cluster \(c) maps to block \(b.value), outside the data area")
            }
            pairs.append((UInt32(c), b.value))
        }
        return (FreeExtent.coalescing(pairs), level)
    }
}
