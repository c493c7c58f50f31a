import Foundation
import PloopDevice
import PloopImage

/// The control protocol between `SimulatorBackend` and a device daemon: one JSON object per line
/// each way over a Unix socket (root only, peer credentials checked). Requests carry a version;
/// long operations answer with progress lines before the final one.
public enum Wire {
    public static let version = 1

    public enum Op: String, Codable, Sendable {
        case info, umount, snapshot, merge, grow, sync, deleteDelta, updateIndex
        case balloon, loadFreeBlocks, freeBlockList, filterFreeBlocks, dropFreeBlocks, relocateBlocks
        case trackInit, trackSetPosition, trackRead, trackStop, trackAbort
    }

    public struct Request: Codable, Sendable {
        public var version = Wire.version
        public var op: Op
        public var path: String?
        public var levels: [Int]?
        public var sizeSectors: UInt64?
        public var inflate: Bool?
        public var keepIntact: Bool?
        public var level: Int?
        public var allocHead: UInt32?
        public var freeExtents: [FreeExtent]?
        public var relocExtents: [RelocExtent]?
        public var position: UInt64?
        public var minLength: UInt32?
        public var maps: [IndexMap]?

        public init(_ op: Op) { self.op = op }
    }

    public struct Response: Codable, Sendable {
        public var ok = true
        /// A progress line; more lines follow.
        public var progress: MergeProgress?
        public var error: WireError?
        public var info: DeviceInfo?
        public var balloon: BalloonReply?
        public var value: UInt64?
        public var range: [UInt64]?
        public var paths: [String]?
        public var freeExtents: [FreeExtent]?

        public init() {}
        public static func failure(_ e: DeviceError) -> Response {
            var r = Response()
            r.ok = false
            r.error = WireError(e)
            return r
        }
    }

    /// `DeviceError` on the wire: its case, its message, and the payload needed to rebuild it.
    public struct WireError: Codable, Sendable {
        public var kind: String
        public var message: String
        public var state: MaintenanceState?
        public var errno: Int32?

        public init(_ e: DeviceError) {
            message = e.description
            switch e {
            case .busy(let s): kind = "busy"; state = s
            case .invalid: kind = "invalid"
            case .again: kind = "again"
            case .aborted: kind = "aborted"
            case .unreadExtents: kind = "unreadExtents"
            case .notSupported: kind = "notSupported"
            case .noSuchDevice: kind = "noSuchDevice"
            case .deviceInUse: kind = "deviceInUse"
            case .notRunning: kind = "notRunning"
            case .readOnly: kind = "readOnly"
            case .outOfRange: kind = "outOfRange"
            case .image(let i): kind = i == .injectedCrash ? "injectedCrash" : "image"
            case .system(_, let n): kind = "system"; errno = n
            case .unavailable: kind = "unavailable"
            }
        }

        public var deviceError: DeviceError {
            switch kind {
            case "busy": .busy(state ?? .off)
            case "again": .again
            case "aborted": .aborted
            case "unreadExtents": .unreadExtents
            case "notSupported": .notSupported(message)
            case "noSuchDevice": .noSuchDevice(message)
            case "deviceInUse": .deviceInUse(message)
            case "notRunning": .notRunning(message)
            case "readOnly": .readOnly(message)
            case "system": .system(message, errno: errno ?? 5)
            case "unavailable": .unavailable(message)
            // Image errors keep their words; their case stays on the daemon's side.
            default: .invalid(message)
            }
        }
    }
}

/// Newline-delimited JSON over a file descriptor.
final class LineChannel: @unchecked Sendable {
    let fd: Int32
    private var buffer = [UInt8]()

    init(fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    func send<T: Encodable>(_ value: T) throws {
        var data = try JSONEncoder().encode(value)
        data.append(UInt8(ascii: "\n"))
        try data.withUnsafeBytes { b in
            var off = 0
            while off < b.count {
                let n = Glibc.write(fd, b.baseAddress! + off, b.count - off)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw DeviceError.system("control socket write", errno: errno)
                }
                off += n
            }
        }
    }

    func receive<T: Decodable>(_ type: T.Type) throws -> T? {
        while true {
            if let nl = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Data(buffer[..<nl])
                buffer.removeSubrange(...nl)
                return try JSONDecoder().decode(T.self, from: line)
            }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw DeviceError.system("control socket read", errno: errno)
            }
            if n == 0 { return nil }
            buffer.append(contentsOf: chunk[0..<n])
        }
    }
}
