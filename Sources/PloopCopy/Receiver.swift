import Foundation
import PloopSystem

/// Builds an image from a copy stream. It trusts nothing: every header is checked before its
/// payload is read, the destination is written under a temporary name and published (renamed,
/// synced) only when the end record arrives; on any error the temporary file is removed.
public struct CopyReceiver {
    public let destination: String
    public let replace: Bool

    public init(destination: String, replace: Bool = false) {
        self.destination = destination
        self.replace = replace
    }

    public struct Summary: Codable, Sendable, Equatable {
        public var records: Int
        public var bytes: UInt64
        public var syncs: Int
    }

    /// Reads records from `input` until the end record. `feedback`, when given, gets the answer to
    /// each sync record.
    public func receive(input: Int32, feedback: Int32? = nil) throws -> Summary {
        if !replace && FileManager.default.fileExists(atPath: destination) {
            throw CopyStream.Error.destinationExists(destination)
        }
        let temp = destination + ".part-\(getpid())"
        let out = try File(path: temp, mode: .createNew)
        var published = false
        defer { if !published { unlink(temp) } }
        var summary = Summary(records: 0, bytes: 0, syncs: 0)
        var offset: UInt64 = 0
        var header = [UInt8](repeating: 0, count: CopyStream.headerSize)
        while true {
            guard try Self.readFull(input, &header) else { throw CopyStream.Error.truncated(at: offset) }
            let (size, pos) = try CopyStream.parseHeader(header, at: offset)
            offset += UInt64(CopyStream.headerSize)
            if size == 0 {
                try out.dataSync()
                guard rename(temp, destination) == 0 else { throw CopyStream.Error.io("rename to \(destination): \(String(cString: strerror(errno)))") }
                published = true
                PathInfo.syncParentDirectory(of: destination)
                return summary
            }
            var slice = [UInt8](repeating: 0, count: Int(size))
            guard try Self.readFull(input, &slice) else { throw CopyStream.Error.truncated(at: offset) }
            offset += UInt64(size)
            if size == CopyStream.syncSize {
                let ok: Bool
                do { try out.dataSync(); ok = true } catch { ok = false }
                summary.syncs += 1
                if let fb = feedback { try Self.writeAll(fb, ok ? CopyStream.success : CopyStream.failure) }
                if !ok { throw CopyStream.Error.io("fdatasync of \(temp) failed") }
                continue
            }
            do { try slice.withUnsafeBytes { try out.write($0, at: pos) } } catch { throw CopyStream.Error.io("\(error)") }
            summary.records += 1
            summary.bytes += UInt64(size)
        }
    }

    /// Fills `buffer`; false if the input ended first (the caller reports where).
    static func readFull(_ fd: Int32, _ buffer: inout [UInt8]) throws -> Bool {
        var done = 0
        while done < buffer.count {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 {
                if errno == EINTR { continue }
                throw CopyStream.Error.io("reading the stream: \(String(cString: strerror(errno)))")
            }
            if n == 0 { return false }
            done += n
        }
        return true
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 {
                if errno == EINTR { continue }
                throw CopyStream.Error.io("writing: \(String(cString: strerror(errno)))")
            }
            done += n
        }
    }
}
