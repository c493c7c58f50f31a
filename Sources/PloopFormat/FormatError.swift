/// Every way a ploop1 header or a size argument can be wrong. Each case says what to do.
public enum FormatError: Error, Sendable, Equatable, Codable, CustomStringConvertible {
    case truncatedHeader(length: Int)
    case badSignature(found: String)
    case wrongType(UInt32)
    case invalidClusterSize(sectors: UInt32)
    case badFirstBlockOffset(sectors: UInt32, clusterSectors: UInt32)
    case batDoesNotFit(entries: UInt32, firstBlockOffset: UInt32)
    case sizeBeyondBAT(sizeSectors: UInt64, entries: UInt32, clusterSectors: UInt32)
    case batEntriesMismatch(entries: UInt32, expected: UInt64)
    case unknownFlags(UInt32)
    case sizeZero
    case sizeTooLarge(sectors: UInt64, limit: UInt64, version: FormatVersion?)
    case v1EntryMisaligned(entry: UInt32, clusterSectors: UInt32)

    public var description: String {
        switch self {
        case .truncatedHeader(let n):
            "header is truncated: the file has \(n) bytes, a ploop1 header needs 64"
        case .badSignature(let s):
            "wrong signature \"\(s)\": not a ploop1 image (expected WithoutFreeSpace or WithouFreSpacExt)"
        case .wrongType(let t):
            "wrong disk type \(t) (ploop1 images have type 2)"
        case .invalidClusterSize(let s):
            "wrong cluster size: \(s) sectors (ploop takes a power of two from 64 to 131072 sectors, 32 KiB to 64 MiB)"
        case .badFirstBlockOffset(let o, let c):
            "wrong first block offset \(o) sectors: it must be a non-zero multiple of the cluster size (\(c) sectors)"
        case .batDoesNotFit(let n, let o):
            "the BAT of \(n) entries does not fit before the first data block at sector \(o)"
        case .sizeBeyondBAT(let s, let n, let c):
            "virtual size \(s) sectors is larger than the \(n) BAT entries of \(c) sectors can map"
        case .batEntriesMismatch(let n, let e):
            "BAT has \(n) entries but the virtual size needs \(e)"
        case .unknownFlags(let f):
            "unknown header flags 0x\(String(f, radix: 16))"
        case .sizeZero:
            "size must be larger than zero"
        case .sizeTooLarge(let s, let l, let v):
            if let v {
                "size of \(s) sectors exceeds the \(v) format limit of \(l) sectors" + (v == .v1 ? ": use -v 2" : "")
            } else {
                "size of \(s) sectors exceeds the limit of \(l) sectors (50 TiB)"
            }
        case .v1EntryMisaligned(let e, let c):
            "v1 BAT entry \(e) is not a multiple of the cluster size (\(c) sectors)"
        }
    }
}
