import Foundation
import PloopDevice
import PloopFormat
import PloopSystem

/// Where the sender's records go: a stream (pipe, socket) or a local file.
public protocol CopySink {
    func data(_ bytes: UnsafeRawBufferPointer, at position: UInt64) throws
    /// Copies `length` bytes of `file` at `position` to the same position, in the kernel where it
    /// can (`scratch` for where it cannot); false when this sink takes bytes only through `data`.
    func copy(from file: File, at position: UInt64, length: Int, scratch: UnsafeMutableRawBufferPointer) throws -> Bool
    /// A durability point: the stream's sync record (answered on the feedback channel), or fdatasync.
    func sync() throws
    func end() throws
}

/// The classic stream on a descriptor, with an optional feedback descriptor for sync answers.
public final class StreamSink: CopySink {
    let fd: Int32
    let feedback: Int32?
    public init(fd: Int32, feedback: Int32?) {
        self.fd = fd
        self.feedback = feedback
    }

    public func data(_ bytes: UnsafeRawBufferPointer, at position: UInt64) throws {
        var off = 0
        while off < bytes.count {
            // Never a record of 4 bytes (it would read as a sync mark): such a tail goes as 8.
            var n = min(bytes.count - off, Int(CopyStream.maxRecord))
            if n == Int(CopyStream.syncSize) { n = bytes.count - off }
            try CopyReceiver.writeAll(fd, CopyStream.header(size: UInt32(n), position: position + UInt64(off)))
            try CopyReceiver.writeAll(fd, Array(UnsafeRawBufferPointer(rebasing: bytes[off..<off + n])))
            off += n
        }
    }

    public func sync() throws {
        try CopyReceiver.writeAll(fd, CopyStream.encode(.sync))
        guard let fb = feedback else {
            // No feedback channel: the original waits 5 s for the receiver to catch up.
            Thread.sleep(forTimeInterval: 5)
            return
        }
        var answer = [UInt8](repeating: 0, count: 8)
        guard try CopyReceiver.readFull(fb, &answer) else { throw CopyStream.Error.feedback("closed by the receiver") }
        guard answer == CopyStream.success else { throw CopyStream.Error.feedback("the receiver answered \(String(decoding: answer, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))") }
    }

    public func end() throws { try CopyReceiver.writeAll(fd, CopyStream.encode(.end)) }
}

extension CopySink {
    public func copy(from file: File, at position: UInt64, length: Int, scratch: UnsafeMutableRawBufferPointer) throws -> Bool { false }
}

/// A local destination file, built under a temporary name and published at the end.
public final class FileSink: CopySink {
    let part: PartFile
    let replace: Bool
    var file: File { part.file }

    public init(destination: String, replace: Bool = false) throws {
        self.replace = replace
        self.part = try PartFile(destination: destination, replace: replace)
    }

    public func data(_ bytes: UnsafeRawBufferPointer, at position: UInt64) throws { try file.write(bytes, at: position) }

    public func copy(from source: File, at position: UInt64, length: Int, scratch: UnsafeMutableRawBufferPointer) throws -> Bool {
        try file.copy(from: source, at: position, to: position, length: length, scratch: scratch)
        return true
    }

    public func sync() throws { try file.dataSync() }
    public func end() throws { try part.publish(replace: replace) }
}

/// The copy procedure of the manual's section 7, written once against `DeviceBackend`: a full pass
/// over the top image, passes over what was written meanwhile until that stops shrinking, a sync
/// point, the `-F` command and a freeze, a final pass, the copy's header made clean, the end.
public struct CopySender {
    public let backend: any DeviceBackend
    public let device: String
    /// File system to freeze for the final pass (the device's mount point), if any.
    public let mountPoint: String?
    /// Run before the freeze (e.g. to stop the container), via /bin/sh -c.
    public let stopCommand: String?
    public let say: (String) -> Void
    /// The full pass's progress (step, MiB done, MiB in all): the long part of a copy.
    public var progress: ((String, Int, Int) -> Void)?

    public init(backend: any DeviceBackend, device: String, mountPoint: String?, stopCommand: String?, say: @escaping (String) -> Void = { _ in }) {
        self.backend = backend
        self.device = device
        self.mountPoint = mountPoint
        self.stopCommand = stopCommand
        self.say = say
    }

    public struct Report: Codable, Sendable, Equatable {
        public var bytesSent: UInt64
        public var passes: Int
        public var totalSeconds: Double
        public var frozenSeconds: Double
        /// Seconds spent in each step, in order (where the time goes).
        public var steps: [StepTime] = []
    }

    public struct StepTime: Codable, Sendable, Equatable {
        public var step: String
        public var seconds: Double
    }

    public enum Failure: Error, CustomStringConvertible {
        case step(String, any Error)
        public var description: String {
            switch self {
            case .step(let s, let e): "copy failed while \(s): \(e)"
            }
        }
    }

    /// Runs the procedure's phases in order (see the type's comment and `CopyRun`); whatever it
    /// ends with, the file system is thawed and tracking aborted.
    public func run(into sink: any CopySink) throws -> Report {
        let info: DeviceInfo
        let image: File
        do {
            info = try backend.info(device)
            guard let top = info.levels.last else { throw DeviceError.notRunning(device) }
            image = try File(path: top.path, mode: .readOnly)
        } catch { throw Failure.step("reading the device", error) }
        let run = CopyRun(self, sink: sink, image: image, clusterBytes: info.clusterBytes)
        defer { run.release() }
        do {
            try run.startTracking()
            try run.fullPass()
            try run.iterativePasses()
            try run.syncPoint()
            try run.stopAndFreeze()
            run.begin("the final pass")
            _ = try run.drain(maxPasses: 3)
            run.report.passes += 1
            let head = try run.cleanHeader(ploop1: info.levels.last?.format == .ploop1)
            try run.stopTrackingAndThaw()
            if let head { try head.withUnsafeBytes { try sink.data($0, at: 0) } }
            run.begin("ending the stream")
            try sink.end()
            run.begin("done")
            run.report.totalSeconds = Date().timeIntervalSince(run.start)
            return run.report
        } catch {
            throw Failure.step(run.step, error)
        }
    }
}

/// One copy's state, shared by its phases: the report, the step under way, the tracking position,
/// whether tracking runs and what is frozen.
final class CopyRun {
    let sender: CopySender
    let sink: any CopySink
    let image: File
    let cb: Int
    let buffer: UnsafeMutableRawBufferPointer
    let start = Date()
    var report = CopySender.Report(bytesSent: 0, passes: 0, totalSeconds: 0, frozenSeconds: 0)
    var step = "reading the device"
    var stepStart = Date()
    var tracking = false
    var trackPos: UInt64 = 0
    var trackEnd: UInt64 = 0
    var frozen: MountedFileSystem?
    var frozenAt: Date?

    var backend: any DeviceBackend { sender.backend }
    var device: String { sender.device }

    init(_ sender: CopySender, sink: any CopySink, image: File, clusterBytes: Int) {
        self.sender = sender
        self.sink = sink
        self.image = image
        self.cb = clusterBytes
        self.buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: clusterBytes, alignment: 4096)
    }

    deinit { buffer.deallocate() }

    /// Moves to the next step, recording how long the last one took.
    func begin(_ next: String) {
        let now = Date()
        report.steps.append(CopySender.StepTime(step: step, seconds: now.timeIntervalSince(stepStart)))
        step = next
        stepStart = now
    }

    /// Thaws and aborts tracking if the run ended before doing so itself.
    func release() {
        thaw()
        if tracking { try? backend.trackAbort(device) }
    }

    func thaw() {
        guard let fs = frozen else { return }
        try? fs.thaw()
        frozen = nil
    }

    // MARK: - Sending

    /// Moves the tracking position to at least `position`: writes below it are tracked from now
    /// on, writes above will be read later anyway.
    func track(upTo position: UInt64) throws {
        guard position > trackPos else { return }
        trackPos = position
        try backend.trackSetPosition(device, position)
    }

    /// Sends a range of the image (which the tracking position already covers).
    func sendTracked(_ range: Range<UInt64>) throws {
        let fileEnd = try image.size()
        var pos = range.lowerBound
        let end = min(range.upperBound, fileEnd)
        guard pos < end else { return }
        // In-kernel copies take the whole range at once.
        if try sink.copy(from: image, at: pos, length: Int(end - pos), scratch: buffer) {
            report.bytesSent += end - pos
            return
        }
        while pos < end {
            let n = Int(min(UInt64(cb) - pos % UInt64(cb), end - pos))
            let got = try image.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: pos)
            if got == 0 { return }  // the file ends here
            try sink.data(UnsafeRawBufferPointer(rebasing: buffer[0..<got]), at: pos)
            report.bytesSent += UInt64(n)
            pos += UInt64(n)
        }
    }

    /// Sends a dirty range, moving the tracking position past it first.
    func send(_ range: Range<UInt64>) throws {
        try track(upTo: range.upperBound)
        try sendTracked(range)
    }

    /// TRACK_READ until nothing is dirty; returns bytes sent. Bounded by wrap-arounds.
    func drain(maxPasses: Int) throws -> UInt64 {
        var sent: UInt64 = 0
        var lastEnd: UInt64 = 0
        var passes = 1
        while let r = try backend.trackRead(device) {
            // TRACK_READ hands an extent over once: it is sent even when it starts a pass over the
            // limit (dropping it lost those writes from the copy).
            let before = report.bytesSent
            try send(r)
            sent += report.bytesSent - before
            if r.lowerBound < lastEnd {
                passes += 1
                if passes > maxPasses { break }
            }
            lastEnd = r.upperBound
        }
        return sent
    }

    // MARK: - The phases

    func startTracking() throws {
        begin("starting dirty tracking")
        trackEnd = try backend.trackInit(device)
        tracking = true
    }

    /// The first pass: 64 MiB windows; in each, the position moves first, then only the file's
    /// data is read (holes of the image file stay holes in the copy). A write landing in a hole
    /// after the position moved is tracked; one before it is data by then.
    func fullPass() throws {
        begin("the full pass")
        var pos: UInt64 = 0
        while pos < trackEnd {
            let windowEnd = min(trackEnd, pos + (64 << 20))
            try track(upTo: windowEnd)
            // Whole clusters: a cluster the file holds only in part goes dense, as it is in the
            // image's own terms.
            let c = UInt64(cb)
            var ranges: [Range<UInt64>] = []
            for r in try image.dataRanges(from: pos, to: windowEnd) {
                let lo = max(pos, r.lowerBound / c * c)
                let hi = min(windowEnd, (r.upperBound + c - 1) / c * c)
                if let last = ranges.last, last.upperBound >= lo {
                    ranges[ranges.count - 1] = last.lowerBound..<max(last.upperBound, hi)
                } else {
                    ranges.append(lo..<hi)
                }
            }
            for r in ranges { try sendTracked(r) }
            pos = windowEnd
            let mib = { (b: UInt64) in Int((b + (1 << 20) - 1) >> 20) }
            sender.progress?("copying (full pass)", mib(pos), mib(trackEnd))
        }
        report.passes = 1
    }

    /// Passes over what was written meanwhile, while that keeps shrinking (at most ten).
    func iterativePasses() throws {
        begin("the iterative passes")
        var last = UInt64.max
        for _ in 0..<10 {
            let sent = try drain(maxPasses: 1)
            report.passes += 1
            if sent == 0 || sent >= last { break }
            last = sent
        }
    }

    /// The destination's bulk goes to disk now, outside the frozen window; meanwhile what the file
    /// system and the device still cache goes down too, and is sent after, so the freeze has only
    /// the last moments' writes to flush.
    func syncPoint() throws {
        begin("the sync point, the source flushed")
        let flushed = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var flushError: (any Error)?
        let (backend, device, mountPoint) = (self.backend, self.device, sender.mountPoint)
        let flusher = Thread {
            if let m = mountPoint { try? MountedFileSystem(m).sync() }
            do { try backend.sync(device) } catch { flushError = error }
            flushed.signal()
        }
        flusher.start()
        let synced = Result { try sink.sync() }
        flushed.wait()
        try synced.get()
        if let flushError { throw flushError }
        begin("sending what the flush wrote")
        _ = try drain(maxPasses: 1)
        report.passes += 1
    }

    /// The `-F` command, then the file system frozen (FIFREEZE syncs it) and the device synced.
    func stopAndFreeze() throws {
        begin("running the stop command")
        if let cmd = sender.stopCommand {
            // posix_spawn (Spawn): Foundation's Process took 50 ms to start a shell here.
            let status: Int32
            do { status = try Spawn.shell(cmd) } catch { throw CopyStream.Error.io("cannot run '\(cmd)': \(error.message)") }
            guard status == 0 else { throw CopyStream.Error.io("'\(cmd)' exited with \(status)") }
        }
        begin("freezing the file system")
        frozenAt = Date()
        if let m = sender.mountPoint {
            let fs: MountedFileSystem
            do { fs = try MountedFileSystem(m) } catch { throw CopyStream.Error.io("open \(m): \(error.message)") }
            do { try fs.freeze() } catch { throw CopyStream.Error.io("FIFREEZE \(m): \(error.message)") }
            frozen = fs
        }
        try backend.sync(device)
    }

    /// The copy's first sector with the in-use mark cleared: read while frozen (it holds BAT
    /// entries too), written after the thaw. Nil for a raw image.
    func cleanHeader(ploop1: Bool) throws -> [UInt8]? {
        begin("making the copy's header clean")
        guard ploop1 else { return nil }
        var bytes = [UInt8](repeating: 0, count: 512)
        _ = try bytes.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
        let mark = ImageHeader.diskInUseOffset
        for i in mark..<mark + 4 { bytes[i] = 0 }
        return bytes
    }

    func stopTrackingAndThaw() throws {
        begin("stopping tracking")
        try backend.trackStop(device)
        tracking = false
        begin("thawing")
        thaw()
        report.frozenSeconds = frozenAt.map { Date().timeIntervalSince($0) } ?? 0
    }
}
