import PloopFormat
import PloopSystem
#if canImport(Glibc)
import Glibc
#endif

/// The original's classic copy stream (lib/pcopy.c), byte for byte, so our sender can feed the
/// original receiver and the reverse:
///
/// ```
///  off size field
///    0   4  marker   0x4cc0ac3d (PLOOPCOPY_MARKER), little-endian
///    4   4  size     payload bytes that follow; 0 = end of stream; 4 = sync mark
///    8   8  pos      byte offset of the payload in the destination file
///   16 size payload
/// ```
///
/// A sync record carries 4 payload bytes (the image's first 4 bytes, ignored); the receiver
/// fdatasyncs and answers "SUCCESS\n" or "FAILURE\n" on the feedback descriptor, if there is one.
public enum CopyStream {
    public static let marker: UInt32 = 0x4CC0_AC3D
    public static let headerSize = 16
    public static let syncSize: UInt32 = 4
    /// Largest payload a receiver accepts in one record (the original sends one cluster, ≤ 64 MiB).
    public static let maxRecord: UInt32 = 64 << 20
    /// Positions past this are refused (the tools' 50 TiB limit plus room for metadata).
    public static let maxPosition: UInt64 = PloopSpec.maxImageSectors * 512 + (1 << 30)
    public static let success = Array("SUCCESS\n".utf8)
    public static let failure = Array("FAILURE\n".utf8)

    public enum Record: Equatable, Sendable {
        case data(position: UInt64, bytes: [UInt8])
        case sync
        case end
    }

    public static func header(size: UInt32, position: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: headerSize)
        for i in 0..<4 { b[i] = UInt8(truncatingIfNeeded: marker >> (8 * UInt32(i))) }
        for i in 0..<4 { b[4 + i] = UInt8(truncatingIfNeeded: size >> (8 * UInt32(i))) }
        for i in 0..<8 { b[8 + i] = UInt8(truncatingIfNeeded: position >> (8 * UInt64(i))) }
        return b
    }

    public static func encode(_ r: Record) -> [UInt8] {
        switch r {
        case .data(let pos, let bytes):
            precondition(!bytes.isEmpty && bytes.count != Int(syncSize), "data records of 0 or 4 bytes would read as end or sync")
            return header(size: UInt32(bytes.count), position: pos) + bytes
        case .sync:
            return header(size: syncSize, position: 0) + [0, 0, 0, 0]
        case .end:
            return header(size: 0, position: 0)
        }
    }

    public enum Error: Swift.Error, Equatable, CustomStringConvertible {
        case badMarker(UInt32, at: UInt64)
        case recordTooLarge(UInt32, at: UInt64)
        case positionOutOfRange(UInt64, at: UInt64)
        case truncated(at: UInt64)
        case destinationExists(String)
        /// The destination is there and is not a regular file (PathInfo.PublishError's words).
        case destinationNotRegular(String)
        /// A descriptor given on the command line (-i, -f) is not open.
        case descriptorNotOpen(role: String, fd: Int32, purpose: String)
        case io(String)
        case feedback(String)

        public var description: String {
            switch self {
            case .badMarker(let m, let at): "stream corrupted: record marker 0x\(String(m, radix: 16)) at stream offset \(at) (expected 0x4cc0ac3d)"
            case .recordTooLarge(let s, let at): "stream corrupted: a record of \(s) bytes at stream offset \(at) (more than 64 MiB)"
            case .positionOutOfRange(let p, let at): "stream corrupted: a record for position \(p) at stream offset \(at) (past any image)"
            case .truncated(let at): "the stream ended at offset \(at) without its end record: the copy is incomplete"
            case .destinationExists(let p): "\(p) already exists: remove it or choose another name"
            case .destinationNotRegular(let s): s
            case .descriptorNotOpen(let role, let fd, let purpose): "\(role) \(fd) is not open: give the descriptor of \(purpose)"
            case .io(let s): s
            case .feedback(let s): "feedback channel: \(s)"
            }
        }
    }

    /// A descriptor given on the command line must be open, or the error says which one it is.
    public static func checkOpen(_ fd: Int32, _ role: String, _ purpose: String) throws(Error) {
        if !Channel.isOpen(fd) {
            throw .descriptorNotOpen(role: role, fd: fd, purpose: purpose)
        }
    }

    /// Parses one header (16 bytes) and validates it; `at` is its stream offset (for messages).
    public static func parseHeader(_ b: [UInt8], at: UInt64) throws(Error) -> (size: UInt32, position: UInt64) {
        func u32(_ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * UInt32($1)) } }
        let m = u32(0)
        guard m == marker else { throw .badMarker(m, at: at) }
        let size = u32(4)
        let pos = (0..<8).reduce(UInt64(0)) { $0 | UInt64(b[8 + $1]) << (8 * UInt64($1)) }
        guard size <= maxRecord else { throw .recordTooLarge(size, at: at) }
        guard pos <= maxPosition, pos + UInt64(size) <= maxPosition else { throw .positionOutOfRange(pos, at: at) }
        return (size, pos)
    }
}
