import CPloopFuse
import CPloopSys
import Foundation
import Logging
import PloopDevice
import PloopImage
import PloopSystem
import Synchronization

/// The daemon behind one simulated device: it holds the `DeviceModel`, serves it as a FUSE file,
/// attaches a loop device to that file, makes `/dev/ploopN` lead to the loop device, and answers
/// maintenance requests on its control socket. Started by `ploop mount` as `ploop __serve`.
public final class SimulatorDaemon: Sendable {
    public struct Options: Sendable {
        public var index: Int
        public var request: MountRequest
        public var threads: Int
        public var paths: RuntimePaths
        public init(index: Int, request: MountRequest, threads: Int = 4, paths: RuntimePaths = RuntimePaths()) {
            self.index = index
            self.request = request
            self.threads = threads
            self.paths = paths
        }
    }

    /// The environment variable naming the log level (swift-log's names; info when unset).
    public static let logLevelVariable = "PLOOP_DAEMON_LOG_LEVEL"

    let options: Options
    let model: DeviceModel
    let device: String
    /// The daemon's log: its stderr, which `SimulatorBackend` points at the device's log file.
    let log: Logger

    /// Where the daemon is in its life.
    enum Phase: Equatable {
        case starting, serving, stopped
    }

    /// What the daemon built (each undone by `teardown`), with its phase. The signal thread, the
    /// accept loop and every serving thread reach these only under `life`'s lock; holding it also
    /// serialises shutdowns (see `shutdown`).
    struct Life {
        var phase = Phase.starting
        var fuse: FuseSession?
        var loop = ""
        var replacedNode: [UInt32]?
        var listener: Channel?
        /// What state.json holds now (nil: not written yet).
        var written: RuntimeState?
    }

    private let life = Mutex(Life())

    /// libfuse's session. Its owner is `Life` (under the lock); the loop thread only runs it, and
    /// libfuse lets another thread end it (`fuse_session_exit`).
    struct FuseSession: @unchecked Sendable {
        let pointer: OpaquePointer
    }

    /// Builds everything; on failure, tears down what was built and rethrows.
    public init(_ options: Options) throws {
        self.options = options
        self.device = DeviceName.name(options.index)
        var log = Logger(label: "ploop.daemon") { label in StreamLogHandler.standardError(label: label) }
        log[metadataKey: "device"] = .string(DeviceName.name(options.index))
        // `ploop -v 4 mount` (or more) asks for every request in the log.
        log.logLevel = ProcessInfo.processInfo.environment[Self.logLevelVariable].flatMap(Logger.Level.init(rawValue:)) ?? .info
        self.log = log
        let dir = options.paths.directory(options.index)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        do {
            // Image files are opened O_DIRECT as the kernel driver opens them (PLOOP_DIRECT_IO=0:
            // through the page cache); a file system that refuses it is said in the log.
            let direct = ProcessInfo.processInfo.environment[DirectIO.variable] != "0"
            let logger = log
            model = try DeviceModel(options.request, opener: PosixOpener(locking: true, direct: direct) { logger.notice("\($0)") })
            log.info("image I/O: \(direct ? "direct (O_DIRECT) where the file system takes it" : "through the page cache (\(DirectIO.variable)=0)")")
        } catch {
            try? FileManager.default.removeItem(atPath: dir)
            throw error
        }
        do {
            try start()
        } catch {
            life.withLock { teardown(&$0) }
            throw error
        }
    }

    private func start() throws {
        let file = options.paths.fuseFile(options.index)
        _ = FileManager.default.createFile(atPath: file, contents: nil, attributes: [.posixPermissions: 0o600])
        var cb = cploop_fuse_callbacks()
        cb.ctx = Unmanaged.passUnretained(self).toOpaque()
        cb.size = { ctx in SimulatorDaemon.from(ctx).model.sizeBytes }
        cb.read = { ctx, buf, size, off in
            let d = SimulatorDaemon.from(ctx)
            do {
                try d.model.read(into: UnsafeMutableRawBufferPointer(start: buf, count: Int(size)), at: off)
                return Int64(size)
            } catch { return -Int64(SimulatorDaemon.errno(for: error)) }
        }
        cb.read_direct = { ctx, req, size, off in
            do {
                var result: Int32 = 0
                _ = try SimulatorDaemon.from(ctx).model.withDirectSource(at: off, length: Int(size)) { fd, at in
                    // The request is answered (or freed) whatever this returns.
                    _ = cploop_fuse_reply_fd(req, fd, at, size)
                    result = 1
                }
                return result
            } catch { return -SimulatorDaemon.errno(for: error) }
        }
        cb.write = { ctx, buf, size, off in
            let d = SimulatorDaemon.from(ctx)
            do {
                try d.model.write(UnsafeRawBufferPointer(start: buf, count: Int(size)), at: off)
                return Int64(size)
            } catch { return -Int64(SimulatorDaemon.errno(for: error)) }
        }
        // Requests on image blocks that take O_DIRECT I/O are submitted with Linux AIO and
        // answered from the completion thread: a worker never waits for the disk, so the device
        // keeps as many requests in flight as the kernel sends (PLOOP_FUSE_ASYNC=0: synchronous).
        cb.start = { ctx, op, isWrite, size, off in
            do {
                let taken = try SimulatorDaemon.from(ctx).model.startDirect(write: isWrite != 0, at: off, length: Int(size)) { fd, at, token in
                    cploop_fuse_submit(op, fd, at, token) == 0
                }
                return taken ? 1 : 0
            } catch { return -SimulatorDaemon.errno(for: error) }
        }
        cb.completed = { ctx, token, _, pos, size, _ in
            SimulatorDaemon.from(ctx).model.finishDirect(token: token, position: pos, length: Int(size))
        }
        cb.flush = { ctx in
            do { try SimulatorDaemon.from(ctx).model.flush(); return 0 } catch { return -SimulatorDaemon.errno(for: error) }
        }
        cb.fallocate = { ctx, mode, off, len in
            let d = SimulatorDaemon.from(ctx)
            // PUNCH_HOLE|KEEP_SIZE (discard) and ZERO_RANGE|KEEP_SIZE (write zeroes) both leave
            // zeros; plain allocation has nothing to do. Never ENOSYS: loop would turn discard off.
            let m = FallocateMode(rawValue: mode)
            if m.isEmpty { return 0 }
            let zeroing: [FallocateMode] = [[.punchHole, .keepSize], [.zeroRange, .keepSize], [.zeroRange], [.keepSize]]
            guard zeroing.contains(m) else { return -EOPNOTSUPP }
            do { try d.model.writeZeroes(at: off, length: len); return 0 } catch { return -SimulatorDaemon.errno(for: error) }
        }
        var err: Int32 = 0
        guard let f = cploop_fuse_mount(file, &cb, &err) else {
            throw DeviceError.system("FUSE mount at \(file) (is /dev/fuse there and are you root?)", errno: -err)
        }
        let session = FuseSession(pointer: f)
        life.withLock { $0.fuse = session }
        log.info("requests: \(cploop_fuse_is_async(f) != 0 ? "asynchronous (Linux AIO) where they map to aligned image blocks, else synchronous" : "synchronous")")
        let threads = Int32(options.threads)
        Thread { cploop_fuse_loop(session.pointer, threads) }.start()
        // Direct I/O: no second page cache over the FUSE file.
        let loop = try LoopDevice.attach(file, readOnly: options.request.readOnly)
        life.withLock { $0.loop = loop }
        let replaced = try Loop.linkNode(device, to: loop)
        life.withLock { $0.replacedNode = replaced }
        // The loop driver scanned the partitions when it attached: their nodes follow.
        try PartitionNodes.publish(device)
        try saveState()
        let listener: Channel
        do { listener = try UnixSocket.listen(options.paths.socket(options.index)) } catch { throw DeviceError.system("control socket", errno: error.errno) }
        life.withLock {
            $0.listener = listener
            $0.phase = .serving
        }
        log.info("serving", metadata: ["images": .array(options.request.images.map { .string($0) }), "loop": .string(loop)])
    }

    static func from(_ ctx: UnsafeMutableRawPointer?) -> SimulatorDaemon {
        Unmanaged<SimulatorDaemon>.fromOpaque(ctx!).takeUnretainedValue()
    }

    static func errno(for error: Error) -> Int32 {
        switch error as? DeviceError {
        case .readOnly: EROFS
        case .outOfRange: EINVAL
        case .image(.io(let e)): e.errno
        default: EIO
        }
    }

    /// Writes state.json (what `ploop list` and a later cleanup read) when what it says changed:
    /// a request that changes nothing (info, a tracking read) costs no write and no fsync. Under
    /// `life`'s lock, so two threads never write it at once and a torn-down device is not
    /// written back.
    func saveState() throws {
        try life.withLock { l throws in
            guard l.phase != .stopped else { return }
            let info = model.info(device: device, backend: "simulator")
            let st = RuntimeState(
                device: device, index: options.index, pid: Host.processID, images: info.levels.map(\.path),
                baseFormat: info.levels.first?.format ?? .ploop1, readOnly: options.request.readOnly,
                clusterBytes: info.clusterBytes, sizeBytes: info.sizeBytes, loop: l.loop,
                fuseFile: options.paths.fuseFile(options.index), state: info.state, replacedNode: l.replacedNode)
            guard st != l.written else { return }
            try st.write(options.paths.state(options.index))
            l.written = st
        }
    }

    /// `saveState`, logging a failure (the device keeps serving; `ploop list` may show old facts).
    func saveStateLogged() {
        do { try saveState() } catch { log.error("cannot write the device's state file", metadata: ["error": "\(error)"]) }
    }

    var phase: Phase { life.withLock { $0.phase } }

    /// Accepts control connections until umount; each connection is served on its own thread.
    public func run() {
        let sigs = Thread { [self] in
            let sig = Signals.waitForTermination()
            log.notice("signal \(sig): stopping")
            do { try shutdown(force: true) } catch { log.error("forced shutdown failed", metadata: ["error": "\(error)"]) }
            exitAfterShutdown()
        }
        sigs.start()
        // The loop keeps its own reference: teardown drops the state's, the process ends after.
        guard let listener = life.withLock({ $0.listener }) else { exitAfterShutdown() }
        while phase == .serving {
            let c: Channel
            do { c = try UnixSocket.accept(listener) } catch {
                if phase != .serving { break }
                log.warning("accept failed", metadata: ["error": "\(error)"])
                continue
            }
            // Only root and the daemon's own user may drive the device.
            guard let peer = try? UnixSocket.peer(c), peer.uid == 0 || peer.uid == Host.userID else { continue }
            Thread { [self] in serve(LineChannel(c, peer: peer.pid)) }.start()
        }
        // Stopped serving: the process ends only once the shutdown that ended it is complete.
        exitAfterShutdown()
    }

    func serve(_ ch: LineChannel) {
        while let line = try? ch.receiveLine() {
            var reply: Wire.Reply
            var umount = false
            switch Wire.decodeRequest(line) {
            case .failure(let e):
                reply = .failed(e)
            case .success(let request):
                umount = request == .umount
                do {
                    reply = try handle(request, ch)
                } catch let e as DeviceError {
                    reply = .failed(e)
                } catch {
                    reply = .failed(.invalid("\(error)"))
                }
            }
            saveStateLogged()
            // Every request and its answer, at debug (`ploop -v 4 mount`).
            if log.logLevel <= .debug {
                log.debug("request", metadata: ["request": .string(String(decoding: line.prefix(512), as: UTF8.self)), "reply": .string("\(reply)".prefix(512).description)])
            }
            do { try ch.send(reply) } catch { log.warning("cannot answer a request", metadata: ["request": "\(line.count) bytes", "error": "\(error)"]) }
            if umount, reply == .done {
                exitAfterShutdown()
            }
        }
    }

    /// Answers one request from the model (every field of the request is there: it decoded).
    func handle(_ request: Wire.Request, _ ch: LineChannel) throws -> Wire.Reply {
        switch request {
        case .info:
            return .info(model.info(device: device, backend: "simulator"))
        case .umount:
            try shutdown(force: false, requester: ch.peer)
        case .snapshot(let newDelta):
            try model.snapshot(newDelta: newDelta)
            life.withLock { logServed($0) }
        case .merge(let from, let to):
            guard from <= to else { throw DeviceError.invalid("merge of levels \(from)..\(to): the first level must be the lower") }
            let before = model.lastMergeReport
            let removed = try model.merge(levels: from...to) { done, total in
                try? ch.send(Wire.Reply.progress(MergeProgress(done: done, total: total)))
            }
            if let r = model.lastMergeReport, r != before {
                log.info("merged the top: \(r.copied) clusters copied in \(r.passes) passes, then \(r.pausedClusters) with I/O held for \(Int(r.pauseSeconds * 1000)) ms")
            }
            return .paths(removed)
        case .grow(let sizeSectors):
            try model.grow(toSectors: sizeSectors)
            try life.withLock { l throws in
                if let f = l.fuse { _ = cploop_fuse_invalidate(f.pointer) }
                try Loop.refreshCapacity(l.loop)
            }
        case .sync:
            try model.sync()
        case .deleteDelta(let level):
            try model.deleteDelta(level: level)
        case .updateIndex(let level, let maps):
            try model.updateIndex(level: level, maps: maps)
        case .balloon(let inflate, let keepIntact):
            return .balloon(try model.balloon(inflate: inflate, keepIntact: keepIntact))
        case .loadFreeBlocks(let level, let extents):
            return .blocks(try model.loadFreeBlocks(level: level, extents: extents))
        case .freeBlockList:
            return .freeExtents(model.freeBlockList())
        case .filterFreeBlocks(let minLength):
            try model.filterFreeBlocks(minLength: minLength)
        case .dropFreeBlocks:
            try model.dropFreeBlocks()
        case .relocateBlocks(let level, let allocHead, let extents):
            return .blocks(try model.relocateBlocks(level: level, allocHead: allocHead, extents: extents))
        case .trackInit:
            return .end(try model.trackInit())
        case .trackSetPosition(let position):
            try model.trackSetPosition(position)
        case .trackRead:
            return .dirty(try model.trackRead())
        case .trackStop:
            try model.trackStop()
        case .trackAbort:
            try model.trackAbort()
        }
        return .done
    }

    /// Stops the device: refuses while a file system holds it (unless forced by a signal), then
    /// detaches the loop device, removes the node, unmounts FUSE, stops the model (clean images)
    /// and removes the runtime directory.
    ///
    /// One shutdown at a time, once: a umount request and a signal (or two umount requests) must
    /// not overlap. If one thread called exit while another was still flushing /dev/ploopN, that
    /// flush would wait on FUSE workers that no longer exist, in an uninterruptible sleep that
    /// keeps the process (and its /dev/fuse descriptor) from ever going away: a device, its mount
    /// and every client hung for good. Seen once in CI.
    /// `requester`: the process asking (its own descriptors of the device do not count, as the
    /// kernel driver's STOP is issued on one).
    func shutdown(force: Bool, requester: Int32? = nil) throws {
        try life.withLock { l throws in
            if l.phase == .stopped { return }
            if !force {
                if BlockNode.isHeld(device) || PartitionNodes.anyBusy(device) {
                    throw DeviceError.deviceInUse("\(device) (a file system is mounted on it: umount it first, or use 'ploop umount -m')")
                }
                // As the kernel driver refuses STOP while the device is open: a process writing
                // to it would otherwise get EIO, and its next open of the vanished node would
                // create a regular file in /dev.
                let holders = PartitionNodes.openers(device, excluding: Set([Host.processID] + (requester.map { [$0] } ?? [])))
                if !holders.isEmpty { throw DeviceError.heldOpen(device, by: holders.map(\.description)) }
                let st = model.state
                if st != .off { throw DeviceError.busy(st) }
            }
            // Whatever the block layer still caches for the device goes down to the model first.
            BlockNode.flush(device)
            logServed(l)
            teardown(&l)
            log.info("stopped")
        }
    }

    /// How the reads and writes so far were served (at each snapshot and at the end).
    func logServed(_ l: Life) {
        guard let f = l.fuse else { return }
        var async: UInt64 = 0, sync: UInt64 = 0
        cploop_fuse_served(f.pointer, &async, &sync)
        log.info("reads and writes so far: \(async) asynchronous, \(sync) synchronous")
    }

    /// Ends the process, but only while no shutdown is under way (see `shutdown`).
    func exitAfterShutdown() -> Never {
        life.withLock { _ in exit(0) }
    }

    /// Undoes what `start` built, in reverse; every failure is logged and the rest still done.
    private func teardown(_ l: inout Life) {
        l.phase = .stopped
        if !l.loop.isEmpty {
            // Partition windows hold the device open: they go first.
            PartitionNodes.removeWindows(device)
            do { try LoopDevice.detach(l.loop) } catch { log.error("cannot detach the loop device", metadata: ["loop": .string(l.loop), "error": "\(error)"]) }
            Loop.unlinkNode(device, restoring: l.replacedNode)
            l.loop = ""
        }
        if let f = l.fuse {
            cploop_fuse_exit(f.pointer)
            cploop_fuse_destroy(f.pointer)
            l.fuse = nil
        }
        do { try model.stop() } catch { log.error("stopping the model left an image unclean", metadata: ["error": "\(error)"]) }
        l.listener = nil
        do { try FileManager.default.removeItem(atPath: options.paths.directory(options.index)) } catch {
            log.warning("cannot remove the runtime folder", metadata: ["error": "\(error)"])
        }
    }
}
