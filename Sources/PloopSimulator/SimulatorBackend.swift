import CPloopSys
import Foundation
import PloopDevice
import PloopImage
import PloopSystem
import Synchronization

/// `DeviceBackend` for kernels without the ploop module: each device is a daemon (`ploop __serve`)
/// serving a `DeviceModel` through FUSE and a loop device; this is its client.
public final class SimulatorBackend: DeviceBackend {
    public let name = "simulator"
    public let paths: RuntimePaths
    /// The `ploop` binary to start daemons with.
    public let executable: String
    public let threads: Int
    /// The log level of the daemons this backend starts ("debug", "trace"; nil: their default,
    /// or what `PLOOP_DAEMON_LOG_LEVEL` in our environment says).
    public let daemonLogLevel: String?
    /// How long umount waits for processes that hold the device open to let go.
    public let umountTimeout: Double

    /// `threads`: FUSE worker threads per device (1: libfuse's single-threaded loop). Default 4,
    /// or `PLOOP_FUSE_THREADS`.
    public init(
        executable: String? = nil, paths: RuntimePaths = RuntimePaths(), threads: Int? = nil, daemonLogLevel: String? = nil,
        umountTimeout: Double = 60
    ) {
        self.paths = paths
        self.daemonLogLevel = daemonLogLevel
        self.umountTimeout = umountTimeout
        self.threads = threads ?? ProcessInfo.processInfo.environment["PLOOP_FUSE_THREADS"].flatMap(Int.init) ?? 4
        self.executable = executable ?? ProcessInfo.processInfo.environment["PLOOP_BINARY"] ?? Self.selfExecutable()
    }

    static func selfExecutable() -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    /// Why this backend cannot run here, or nil.
    public static func unavailableReason() -> String? {
        if Host.userID != 0 { return "the simulator needs root (FUSE allow_other, loop devices, /dev nodes)" }
        if !Host.canReadWrite("/dev/fuse") { return "/dev/fuse is missing (modprobe fuse; apt-get install fuse3)" }
        if !Host.canReadWrite("/dev/loop-control") { return "/dev/loop-control is missing (modprobe loop)" }
        return nil
    }

    func index(_ device: String) throws(DeviceError) -> Int {
        guard let n = DeviceName.index(device) else { throw .noSuchDevice(device) }
        return n
    }

    // MARK: - Mount

    public func mount(_ request: MountRequest) throws(DeviceError) -> String {
        if let why = Self.unavailableReason() { throw .unavailable(why) }
        do { try paths.ensureRoot() } catch { throw .system("creating \(paths.root)", errno: EACCES) }
        // One mount at a time picks a device and starts its daemon.
        let lock: File
        do {
            lock = try File(path: paths.lock, mode: .createOrOpen)
        } catch { throw .system("\(paths.lock)", errno: error.errno) }
        while (try? lock.tryLock(.exclusive)) != true { Host.pause(milliseconds: 10) }
        defer { lock.unlock() }
        let n: Int
        if let d = request.device {
            guard let i = DeviceName.index(d) else { throw .badDeviceName(d) }
            if FileManager.default.fileExists(atPath: paths.directory(i)) { throw .deviceInUse(d) }
            if let (major, _) = BlockNode.numbers(d), major != 182 {
                throw .deviceInUse("\(d) (a block device that is not ploop's)")
            }
            n = i
        } else {
            n = (0..<4096).first { i in
                !FileManager.default.fileExists(atPath: paths.directory(i))
                    && (BlockNode.numbers(DeviceName.name(i)).map { $0.0 == 182 } ?? !FileManager.default.fileExists(atPath: DeviceName.name(i)))
            } ?? 4096
        }
        try spawn(index: n, request)
        return DeviceName.name(n)
    }

    /// Starts the daemon detached (own session) and waits until it reports ready or failed.
    func spawn(index n: Int, _ request: MountRequest) throws(DeviceError) {
        let dir = paths.directory(n)
        do {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch { throw .system("creating \(dir)", errno: EACCES) }
        var launched = request
        launched.images = request.images.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
        launched.device = DeviceName.name(n)
        let launch = Wire.Launch(index: n, threads: threads, runDir: paths.root, request: launched, readyFD: 3)
        let args: [String]
        do { args = try launch.arguments(executable: executable) } catch { throw .invalid("describing the daemon to start: \(error)") }
        // The crash hook of a command under test is for that command: the daemon it starts
        // must outlive it, as a real daemon outlives a killed client. Hooks meant for the daemon
        // (PLOOP_TEST_DAEMON_*) become its own.
        var environment = CrashPoint.daemonEnvironment(ProcessInfo.processInfo.environment)
        if let daemonLogLevel { environment[SimulatorDaemon.logLevelVariable] = daemonLogLevel }
        let pid: Int32
        let ch: LineChannel
        do {
            let readiness = try Channel.pipe()
            // Its own session; stdin /dev/null; stdout and stderr the log; fd 3 the readiness pipe.
            pid = try Spawn.start(
                executable, arguments: args, environment: environment,
                descriptors: [(0, .null), (1, .append(paths.log(n))), (2, .descriptor(1)), (3, .descriptor(readiness.write.fd))],
                newSession: true)
            ch = LineChannel(readiness.read)
        } catch {
            try? FileManager.default.removeItem(atPath: dir)
            throw .system("starting \(executable) __serve", errno: error.errno)
        }
        // Our write end closed with the scope: only the daemon holds one, so the read ends if it dies.
        let line = (try? ch.receive(Wire.Ready.self)) ?? nil
        if let line, line.error == nil { return }
        // Failed: reap the daemon and leave nothing behind, whatever it had built before it died.
        _ = try? Spawn.wait(pid)
        let log = (try? String(contentsOfFile: paths.log(n), encoding: .utf8)) ?? ""
        cleanupUnborn(n)
        throw line?.error ?? .unavailable("the device daemon exited before it was ready: \(log.trimmingCharacters(in: .whitespacesAndNewlines))")
    }

    // MARK: - Requests

    /// Idle connections to daemons, by device index: a connection per request would cost a
    /// connect, an accept and a thread on the daemon's side each time (the copy sender makes
    /// thousands of tracking calls).
    private let idle = Mutex<[Int: LineChannel]>([:])

    func call(_ device: String, _ req: Wire.Request, progress: (@Sendable (Int, Int) -> Void)? = nil) throws(DeviceError) -> Wire.Reply {
        let n = try index(device)
        guard FileManager.default.fileExists(atPath: paths.directory(n)) else { throw .noSuchDevice(device) }
        let message = Wire.Message(req)
        // A pooled connection may be stale (its daemon gone): if sending on it fails, the request
        // never arrived and one fresh connection is tried.
        if let pooled = idle.withLock({ $0.removeValue(forKey: n) }) {
            if (try? pooled.send(message)) != nil {
                return try finish(device, n, pooled, req, progress)
            }
        }
        guard let socket = try? UnixSocket.connect(paths.socket(n)) else {
            throw .notRunning("\(device) (its daemon is gone: 'ploop umount -d \(device)' cleans up, then mount again)")
        }
        let ch = LineChannel(socket)
        do { try ch.send(message) } catch { throw .system("control socket of \(device)", errno: EPIPE) }
        return try finish(device, n, ch, req, progress)
    }

    /// Reads the answer (after any progress lines) and puts the connection back.
    private func finish(_ device: String, _ n: Int, _ ch: LineChannel, _ req: Wire.Request, _ progress: (@Sendable (Int, Int) -> Void)?) throws(DeviceError) -> Wire.Reply {
        do {
            while let reply = try ch.receive(Wire.Reply.self) {
                if case .progress(let p) = reply {
                    progress?(p.done, p.total)
                    continue
                }
                if req != .umount { idle.withLock { $0[n] = ch } }
                if case .failed(let e) = reply { throw e }
                return reply
            }
        } catch let e as DeviceError {
            throw e
        } catch {
            throw .system("control socket of \(device)", errno: EPROTO)
        }
        if req == .umount { return .done }
        throw .notRunning("\(device) (its daemon stopped while answering)")
    }

    /// A reply of the wrong kind: a daemon of another build, or a bug.
    static func unexpected(_ reply: Wire.Reply, to req: Wire.Request) -> DeviceError {
        .system("the daemon answered \(req) with \(reply)", errno: EPROTO)
    }

    /// Calls and expects a plain `done`.
    func perform(_ device: String, _ req: Wire.Request) throws(DeviceError) {
        let reply = try call(device, req)
        guard reply == .done else { throw Self.unexpected(reply, to: req) }
    }

    public func umount(_ device: String) throws(DeviceError) {
        let n = try index(device)
        guard let st = RuntimeState.read(paths.state(n)) else {
            if FileManager.default.fileExists(atPath: paths.directory(n)) {
                try? FileManager.default.removeItem(atPath: paths.directory(n))
                return
            }
            throw .noSuchDevice(device)
        }
        if Host.processExists(st.pid) {
            do throws(DeviceError) {
                try stopWaitingForHolders(device)
                // Wait for the daemon to be gone, so its images are unlocked when we return.
                for _ in 0..<1000 {
                    if !Host.processExists(st.pid) { break }
                    if isZombie(st.pid) {
                        // Started by this process: reap it (elsewhere waitpid says ECHILD, harmlessly).
                        Spawn.reapIfEnded(st.pid)
                        break
                    }
                    Host.pause(milliseconds: 10)
                }
                // A daemon that stops cleanly removes its folder before it exits; one that died
                // while stopping (its connection closes as a clean stop's does) left its loop
                // device, node and FUSE mount: they are cleaned up as after any death.
                if !Host.processExists(st.pid) || isZombie(st.pid), RuntimeState.read(paths.state(n)) != nil {
                    cleanupDead(st)
                }
                return
            } catch .notRunning {
                // Fall through to cleaning up after a dead daemon.
            } catch { throw error }
        }
        cleanupDead(st)
    }

    /// The umount request, repeated while processes hold the device open (a late close, udev),
    /// for up to `umountTimeout` seconds, as the kernel backend repeats STOP on EBUSY.
    func stopWaitingForHolders(_ device: String) throws(DeviceError) {
        let deadline = Host.monotonicNanoseconds() + UInt64(max(0, umountTimeout) * 1e9)
        var delay = 10
        while true {
            do throws(DeviceError) {
                return try perform(device, .umount)
            } catch .heldOpen(let d, let by) {
                if Host.monotonicNanoseconds() >= deadline { throw .heldOpen(d, by: by) }
            } catch { throw error }
            Host.pause(milliseconds: delay)
            delay = min(delay * 2, 500)
        }
    }

    func isZombie(_ pid: Int32) -> Bool {
        guard let s = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return true }
        return s.contains(") Z ")
    }

    /// After a daemon died (SIGKILL, crash): detach the loop device, drop the FUSE mount, restore
    /// the node, remove the runtime directory. The images keep their in-use mark; the next mount
    /// checks them.
    /// After a daemon that died before it was ready: what it built (the FUSE mount, a loop device
    /// on it, the node, state.json if it got that far) is taken down, found by where it must be.
    func cleanupUnborn(_ n: Int) {
        if let st = RuntimeState.read(paths.state(n)) {
            cleanupDead(st)
            return
        }
        let device = DeviceName.name(n)
        for loop in LoopDevice.backedBy(paths.fuseFile(n)) {
            // The node is ours to remove only while it is this loop device's.
            if let node = BlockNode.numbers(device), let numbers = BlockNode.numbers(loop), node == numbers {
                PartitionNodes.removeWindows(device)
                Loop.unlinkNode(device, restoring: nil)
            }
            try? LoopDevice.detach(loop)
        }
        try? MountedFileSystem.detach(paths.fuseFile(n))
        try? FileManager.default.removeItem(atPath: paths.directory(n))
    }

    func cleanupDead(_ st: RuntimeState) {
        PartitionNodes.removeWindows(st.device)
        if !st.loop.isEmpty { try? LoopDevice.detach(st.loop) }
        Loop.unlinkNode(st.device, restoring: st.replacedNode)
        try? MountedFileSystem.detach(st.fuseFile)
        try? FileManager.default.removeItem(atPath: paths.directory(st.index))
    }

    public func snapshot(_ device: String, newDelta: String) throws(DeviceError) {
        try perform(device, .snapshot(newDelta: URL(fileURLWithPath: newDelta).standardizedFileURL.path))
    }

    public func merge(_ device: String, levels: ClosedRange<Int>, progress: (@Sendable (Int, Int) -> Void)?) throws(DeviceError) -> [String] {
        let req = Wire.Request.merge(from: levels.lowerBound, to: levels.upperBound)
        let reply = try call(device, req, progress: progress)
        guard case .paths(let p) = reply else { throw Self.unexpected(reply, to: req) }
        return p
    }

    public func grow(_ device: String, sizeSectors: UInt64) throws(DeviceError) { try perform(device, .grow(sizeSectors: sizeSectors)) }

    public func sync(_ device: String) throws(DeviceError) {
        // Push what the block layer still caches down to the daemon first.
        BlockNode.flush(device)
        try perform(device, .sync)
    }

    public func deleteDelta(_ device: String, level: Int) throws(DeviceError) { try perform(device, .deleteDelta(level: level)) }

    public func updateIndex(_ device: String, level: Int, maps: [IndexMap]) throws(DeviceError) {
        try perform(device, .updateIndex(level: level, maps: maps))
    }

    public func balloon(_ device: String, inflate: Bool, keepIntact: Bool) throws(DeviceError) -> BalloonReply {
        let req = Wire.Request.balloon(inflate: inflate, keepIntact: keepIntact)
        let reply = try call(device, req)
        guard case .balloon(let b) = reply else { throw Self.unexpected(reply, to: req) }
        return b
    }

    public func loadFreeBlocks(_ device: String, level: Int, extents: [FreeExtent]) throws(DeviceError) -> UInt32 {
        try blocks(device, .loadFreeBlocks(level: level, extents: extents))
    }

    public func freeBlockList(_ device: String) throws(DeviceError) -> [FreeExtent] {
        let reply = try call(device, .freeBlockList)
        guard case .freeExtents(let e) = reply else { throw Self.unexpected(reply, to: .freeBlockList) }
        return e
    }

    public func filterFreeBlocks(_ device: String, minLength: UInt32) throws(DeviceError) {
        try perform(device, .filterFreeBlocks(minLength: minLength))
    }

    public func dropFreeBlocks(_ device: String) throws(DeviceError) { try perform(device, .dropFreeBlocks) }

    public func relocateBlocks(_ device: String, level: Int, allocHead: UInt32, extents: [RelocExtent]) throws(DeviceError) -> UInt32 {
        try blocks(device, .relocateBlocks(level: level, allocHead: allocHead, extents: extents))
    }

    private func blocks(_ device: String, _ req: Wire.Request) throws(DeviceError) -> UInt32 {
        let reply = try call(device, req)
        guard case .blocks(let n) = reply else { throw Self.unexpected(reply, to: req) }
        return n
    }

    public func trackInit(_ device: String) throws(DeviceError) -> UInt64 {
        let reply = try call(device, .trackInit)
        guard case .end(let end) = reply else { throw Self.unexpected(reply, to: .trackInit) }
        return end
    }

    public func trackSetPosition(_ device: String, _ position: UInt64) throws(DeviceError) { try perform(device, .trackSetPosition(position)) }

    public func trackRead(_ device: String) throws(DeviceError) -> Range<UInt64>? {
        let reply = try call(device, .trackRead)
        guard case .dirty(let r) = reply else { throw Self.unexpected(reply, to: .trackRead) }
        return r
    }

    public func trackStop(_ device: String) throws(DeviceError) { try perform(device, .trackStop) }
    public func trackAbort(_ device: String) throws(DeviceError) { try perform(device, .trackAbort) }

    public func info(_ device: String) throws(DeviceError) -> DeviceInfo {
        let n = try index(device)
        var info: DeviceInfo
        do throws(DeviceError) {
            let reply = try call(device, .info)
            guard case .info(let i) = reply else { throw Self.unexpected(reply, to: .info) }
            info = i
        } catch .notRunning {
            guard let st = RuntimeState.read(paths.state(n)) else { throw .noSuchDevice(device) }
            info = Self.info(from: st)
        } catch { throw error }
        info.log = paths.log(n)
        return info
    }

    static func info(from st: RuntimeState) -> DeviceInfo {
        DeviceInfo(
            device: st.device, backend: "simulator", sizeBytes: st.sizeBytes, clusterBytes: st.clusterBytes, state: st.state,
            running: false,
            levels: st.images.enumerated().map {
                LevelInfo(level: $0.offset, path: $0.element, format: $0.offset == 0 ? st.baseFormat : .ploop1, readOnly: st.readOnly || $0.offset < st.images.count - 1)
            }, mergeProgress: nil)
    }

    public func list() throws(DeviceError) -> [DeviceInfo] {
        paths.indexes().compactMap { n in
            guard let st = RuntimeState.read(paths.state(n)) else { return nil }
            if let i = try? info(st.device) { return i }
            var i = Self.info(from: st)
            i.log = paths.log(n)
            return i
        }
    }

    public func openIO(_ device: String) throws(DeviceError) -> any DeviceIO {
        _ = try index(device)
        return try BlockDeviceIO(device: device)
    }
}
