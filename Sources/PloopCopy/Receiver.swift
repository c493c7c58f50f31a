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
    /// each sync record. The sender going away (EPIPE on `feedback`, the input ending early) is an
    /// error with the destination left as it was, never a silent death by SIGPIPE.
    public func receive(input: Int32, feedback: Int32? = nil) throws -> Summary {
        Signals.ignoreBrokenPipe()
        try CopyStream.checkOpen(input, "input descriptor (-i)", "the stream to read")
        if let fb = feedback { try CopyStream.checkOpen(fb, "feedback descriptor (-f)", "the channel back to the sender") }
        let part = try PartFile(destination: destination, replace: replace)
        let out = part.file
        var summary = Summary(records: 0, bytes: 0, syncs: 0)
        var offset: UInt64 = 0
        var header = [UInt8](repeating: 0, count: CopyStream.headerSize)
        while true {
            guard try Self.readFull(input, &header) else { throw CopyStream.Error.truncated(at: offset) }
            let (size, pos) = try CopyStream.parseHeader(header, at: offset)
            offset += UInt64(CopyStream.headerSize)
            if size == 0 {
                try part.publish(replace: replace)
                return summary
            }
            var slice = [UInt8](repeating: 0, count: Int(size))
            guard try Self.readFull(input, &slice) else { throw CopyStream.Error.truncated(at: offset) }
            offset += UInt64(size)
            if size == CopyStream.syncSize {
                var failure: (any Error)?
                do { try out.dataSync() } catch { failure = error }
                summary.syncs += 1
                if let fb = feedback {
                    do { try Self.writeAll(fb, failure == nil ? CopyStream.success : CopyStream.failure) } catch {
                        throw CopyStream.Error.feedback("answering a sync on descriptor \(fb): \(error)")
                    }
                }
                if let failure { throw part.failure("syncing", failure) }
                continue
            }
            do { try slice.withUnsafeBytes { try out.write($0, at: pos) } } catch { throw part.failure("writing", error) }
            summary.records += 1
            summary.bytes += UInt64(size)
        }
    }

    /// Fills `buffer`; false if the input ended first (the caller reports where).
    static func readFull(_ fd: Int32, _ buffer: inout [UInt8]) throws(CopyStream.Error) -> Bool {
        do { return try Channel(fd, owning: false).readFull(&buffer) } catch { throw .io("reading the stream: \(error.message)") }
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws(CopyStream.Error) {
        do { try Channel(fd, owning: false).writeAll(bytes) } catch { throw .io(error.message) }
    }
}
