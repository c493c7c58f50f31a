import Foundation
import PloopSystem
import PloopDevice
import PloopImage

/// The control protocol between `SimulatorBackend` and a device daemon: one JSON object per line
/// each way over a Unix socket (root only, peer credentials checked). Requests carry a version;
/// long operations answer with progress lines before the final one.
public enum Wire {
    /// Bumped whenever a request or reply changes shape: a daemon started by another build
    /// answers a request of this one with a clear error instead of misreading it.
    public static let version = 2

    /// One request per `DeviceBackend` call that a running device answers (mount, list and
    /// openIO need no daemon). Every field is required: a request that lacks one does not decode.
    public enum Request: Codable, Sendable, Equatable {
        case info
        case umount
        case snapshot(newDelta: String)
        case merge(from: Int, to: Int)
        case grow(sizeSectors: UInt64)
        case sync
        case deleteDelta(level: Int)
        case updateIndex(level: Int, maps: [IndexMap])
        case balloon(inflate: Bool, keepIntact: Bool)
        case loadFreeBlocks(level: Int, extents: [FreeExtent])
        case freeBlockList
        case filterFreeBlocks(minLength: UInt32)
        case dropFreeBlocks
        case relocateBlocks(level: Int, allocHead: UInt32, extents: [RelocExtent])
        case trackInit
        case trackSetPosition(UInt64)
        case trackRead
        case trackStop
        case trackAbort
    }

    /// What goes on the socket: the request with the protocol version.
    public struct Message: Codable, Sendable, Equatable {
        public var version: Int
        public var request: Request
        public init(_ request: Request) {
            self.version = Wire.version
            self.request = request
        }
    }

    /// The answers. `progress` lines (long operations) come before the final reply.
    public enum Reply: Codable, Sendable, Equatable {
        case progress(MergeProgress)
        case failed(DeviceError)
        case done
        case info(DeviceInfo)
        case balloon(BalloonReply)
        /// loadFreeBlocks, relocateBlocks: a count of blocks or a new allocation head.
        case blocks(UInt32)
        /// trackInit: where tracking ends.
        case end(UInt64)
        /// trackRead: the next dirty extent, nil when none is left.
        case dirty(Range<UInt64>?)
        /// merge: the files that left the stack.
        case paths([String])
        case freeExtents([FreeExtent])
    }

    /// Decodes one request line: a version from another build, and a line that is not a request
    /// of this version, are errors that say so.
    public static func decodeRequest(_ line: Data) -> Result<Request, DeviceError> {
        struct Probe: Decodable { var version: Int }
        guard let probe = try? JSONDecoder().decode(Probe.self, from: line) else {
            return .failure(.protocolMismatch("not a control request (no protocol version)"))
        }
        guard probe.version == version else {
            return .failure(.protocolMismatch("control protocol version \(probe.version) is not \(version): use the same ploop binary for mount and the other commands"))
        }
        do { return .success(try JSONDecoder().decode(Message.self, from: line).request) } catch {
            return .failure(.protocolMismatch("malformed control request: \(error)"))
        }
    }

    /// How the daemon is started: the one description both the starter (`SimulatorBackend`) and
    /// the daemon (`ploop __serve --launch JSON`) use.
    public struct Launch: Codable, Sendable, Equatable {
        public var index: Int
        public var threads: Int
        public var runDir: String
        public var request: MountRequest
        /// The descriptor the daemon reports readiness on.
        public var readyFD: Int32

        public init(index: Int, threads: Int, runDir: String, request: MountRequest, readyFD: Int32 = 3) {
            self.index = index
            self.threads = threads
            self.runDir = runDir
            self.request = request
            self.readyFD = readyFD
        }

        public func arguments(executable: String) throws -> [String] {
            let json = String(decoding: try JSONEncoder().encode(self), as: UTF8.self)
            return [executable, "__serve", "--launch", json]
        }

        public static func decode(_ json: String) throws -> Launch {
            try JSONDecoder().decode(Launch.self, from: Data(json.utf8))
        }
    }

    /// The daemon's one line on its readiness descriptor: nil, or why it could not start (the
    /// model's own error, so a refused mount reads the same on every backend).
    public struct Ready: Codable, Sendable, Equatable {
        public var error: DeviceError?
        public init(error: DeviceError? = nil) { self.error = error }
    }
}

/// Newline-delimited JSON over a file descriptor.
final class LineChannel: @unchecked Sendable {
    // @unchecked: one thread uses a channel at a time (a serving thread, or a client call that
    // took it from the idle pool).
    let channel: Channel
    /// The process at the other end, where the daemon knows it (SO_PEERCRED).
    let peer: Int32?
    private var buffer = [UInt8]()

    init(_ channel: Channel, peer: Int32? = nil) {
        self.channel = channel
        self.peer = peer
    }

    func send<T: Encodable>(_ value: T) throws {
        var data = try JSONEncoder().encode(value)
        data.append(UInt8(ascii: "\n"))
        do { try channel.writeAll(Array(data)) } catch { throw DeviceError.system("control socket write", errno: error.errno) }
    }

    func receive<T: Decodable>(_ type: T.Type) throws -> T? {
        guard let line = try receiveLine() else { return nil }
        return try JSONDecoder().decode(T.self, from: line)
    }

    /// The next line, without its newline; nil at the end of the stream.
    func receiveLine() throws -> Data? {
        while true {
            if let nl = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Data(buffer[..<nl])
                buffer.removeSubrange(...nl)
                return line
            }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n: Int
            do { n = try chunk.withUnsafeMutableBytes { b in Result { () throws(SystemError) in try channel.readSome(into: b) } }.get() } catch {
                throw DeviceError.system("control socket read", errno: error.errno)
            }
            if n == 0 { return nil }
            buffer.append(contentsOf: chunk[0..<n])
        }
    }
}
