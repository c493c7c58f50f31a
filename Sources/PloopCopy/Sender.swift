import CPloopSys
import Foundation
import PloopDevice
import PloopSystem

/// Where the sender's records go: a stream (pipe, socket) or a local file.
public protocol CopySink {
    func data(_ bytes: UnsafeRawBufferPointer, at position: UInt64) throws
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

/// A local destination file, built under a temporary name and published at the end.
public final class FileSink: CopySink {
    let destination: String
    let temp: String
    let file: File
    var published = false

    public init(destination: String, replace: Bool = false) throws {
        if !replace && FileManager.default.fileExists(atPath: destination) { throw CopyStream.Error.destinationExists(destination) }
        self.destination = destination
        self.temp = destination + ".part-\(getpid())"
        self.file = try File(path: temp, mode: .createNew)
    }

    deinit { if !published { unlink(temp) } }

    public func data(_ bytes: UnsafeRawBufferPointer, at position: UInt64) throws { try file.write(bytes, at: position) }
    public func sync() throws { try file.dataSync() }
    public func end() throws {
        try file.dataSync()
        guard rename(temp, destination) == 0 else { throw CopyStream.Error.io("rename to \(destination): \(String(cString: strerror(errno)))") }
        published = true
        PathInfo.syncParentDirectory(of: destination)
    }
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
    }

    public enum Failure: Error, CustomStringConvertible {
        case step(String, any Error)
        public var description: String {
            switch self {
            case .step(let s, let e): "copy failed while \(s): \(e)"
            }
        }
    }

    public func run(into sink: any CopySink) throws -> Report {
        let start = Date()
        var report = Report(bytesSent: 0, passes: 0, totalSeconds: 0, frozenSeconds: 0)
        var step = "reading the device"
        var tracking = false
        var frozen: Int32 = -1
        var frozenAt: Date?
        func fail(_ e: any Error) -> Failure { .step(step, e) }
        defer {
            if frozen >= 0 {
                _ = cploop_fithaw(frozen)
                close(frozen)
            }
            if tracking { try? backend.trackAbort(device) }
        }
        do {
            let info = try backend.info(device)
            guard let top = info.levels.last else { throw DeviceError.notRunning(device) }
            let cb = info.clusterBytes
            let image = try File(path: top.path, mode: .readOnly)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: cb, alignment: 4096)
            defer { buffer.deallocate() }
            var trackPos: UInt64 = 0
            func send(_ range: Range<UInt64>) throws {
                var pos = range.lowerBound
                while pos < range.upperBound {
                    let n = Int(min(UInt64(cb) - pos % UInt64(cb), range.upperBound - pos))
                    if pos + UInt64(n) > trackPos {
                        // Ahead in 64 MiB steps: a position ahead of what was read only means
                        // more writes get tracked (and sent again), never fewer; and it saves a
                        // round trip to the device per cluster.
                        trackPos = min(range.upperBound, pos + UInt64(n) + (64 << 20))
                        trackPos = max(trackPos, pos + UInt64(n))
                        try backend.trackSetPosition(device, trackPos)
                    }
                    let got = try image.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: pos)
                    if got == 0 { return }  // the file ends here
                    try sink.data(UnsafeRawBufferPointer(rebasing: buffer[0..<got]), at: pos)
                    report.bytesSent += UInt64(got)
                    pos += UInt64(n)
                }
            }
            /// TRACK_READ until nothing is dirty; returns bytes sent. Bounded by wrap-arounds.
            func drain(maxPasses: Int) throws -> UInt64 {
                var sent: UInt64 = 0
                var lastEnd: UInt64 = 0
                var passes = 1
                while let r = try backend.trackRead(device) {
                    if r.lowerBound < lastEnd {
                        passes += 1
                        if passes > maxPasses { break }
                    }
                    lastEnd = r.upperBound
                    let before = report.bytesSent
                    try send(r)
                    sent += report.bytesSent - before
                }
                return sent
            }
            step = "starting dirty tracking"
            let end = try backend.trackInit(device)
            tracking = true
            step = "the full pass"
            try send(0..<end)
            report.passes = 1
            step = "the iterative passes"
            var last = UInt64.max
            for _ in 0..<10 {
                let sent = try drain(maxPasses: 1)
                report.passes += 1
                if sent == 0 || sent >= last { break }
                last = sent
            }
            step = "the sync point"
            try sink.sync()
            step = "running the stop command"
            if let cmd = stopCommand {
                let p = Process()
                p.executableURL = URL(fileURLWithPath: "/bin/sh")
                p.arguments = ["-c", cmd]
                try p.run()
                p.waitUntilExit()
                guard p.terminationStatus == 0 else { throw CopyStream.Error.io("'\(cmd)' exited with \(p.terminationStatus)") }
            }
            step = "freezing the file system"
            frozenAt = Date()
            if let m = mountPoint {
                let fd = open(m, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
                guard fd >= 0 else { throw CopyStream.Error.io("open \(m): \(String(cString: strerror(errno)))") }
                _ = cploop_syncfs(fd)
                let r = cploop_fifreeze(fd)
                guard r == 0 else {
                    close(fd)
                    throw CopyStream.Error.io("FIFREEZE \(m): \(String(cString: strerror(-r)))")
                }
                frozen = fd
            }
            try backend.sync(device)
            step = "the final pass"
            _ = try drain(maxPasses: 3)
            report.passes += 1
            step = "making the copy's header clean"
            if top.format == .ploop1 {
                var head = [UInt8](repeating: 0, count: 512)
                _ = try head.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
                for i in 44..<48 { head[i] = 0 }
                try head.withUnsafeBytes { try sink.data($0, at: 0) }
            }
            step = "stopping tracking"
            try backend.trackStop(device)
            tracking = false
            step = "ending the stream"
            try sink.end()
            report.frozenSeconds = frozenAt.map { Date().timeIntervalSince($0) } ?? 0
            report.totalSeconds = Date().timeIntervalSince(start)
            return report
        } catch {
            throw fail(error)
        }
    }
}
