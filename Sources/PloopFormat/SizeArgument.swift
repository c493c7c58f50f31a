/// Parses the `-s SIZE` argument of the original tools.
///
/// `NUMBER` alone counts 512-byte **sectors**, as in the original (`-s 2048` is 1 MiB).
/// `NUMBER` followed by `k`, `m`, `g` or `t` (either case; binary units) counts bytes, which must
/// come out as whole sectors. `NUMBERb` is an explicit byte count (our addition), also whole sectors.
public enum SizeArgument {
    public enum ParseError: Error, Sendable, Equatable, CustomStringConvertible {
        case empty
        case notANumber(String)
        case negative(String)
        case zero(String)
        case unknownSuffix(String)
        case notSectorMultiple(String, bytes: UInt64)
        case tooLarge(String, limitSectors: UInt64)

        public var description: String {
            switch self {
            case .empty: "size is empty: give NUMBER (sectors) or NUMBER with k, m, g or t"
            case .notANumber(let s): "size \"\(s)\" is not a number: use e.g. 2048 (sectors), 64k, 10g or 2t"
            case .negative(let s): "size \"\(s)\" is negative"
            case .zero(let s): "size \"\(s)\" is zero: an image needs at least one sector"
            case .unknownSuffix(let s): "size \"\(s)\" has an unknown unit: use k, m, g or t (binary), or b for bytes"
            case .notSectorMultiple(let s, let b): "size \"\(s)\" is \(b) bytes, not a multiple of 512-byte sectors"
            case .tooLarge(let s, let limit):
                "size \"\(s)\" is larger than the largest image ploop supports (\(SizeArgument.describe(bytes: limit * PloopSpec.sectorSize)), \(limit) sectors)"
            }
        }
    }

    /// The size in sectors, at most `PloopSpec.maxImageSectors` (50 TiB): every size a command
    /// takes passes here once, so nothing after it has to fear overflow in `* 512` or `off_t`.
    public static func sectors(_ text: String) throws(ParseError) -> UInt64 {
        let value = try unboundedSectors(text)
        guard value <= PloopSpec.maxImageSectors else { throw .tooLarge(text, limitSectors: PloopSpec.maxImageSectors) }
        return value
    }

    static func unboundedSectors(_ text: String) throws(ParseError) -> UInt64 {
        let s = text.trimmingSpaces
        guard !s.isEmpty else { throw .empty }
        if s.hasPrefix("-") { throw .negative(text) }
        var digits = Substring(s)
        var multiplier: UInt64? = nil  // nil: sectors
        if let last = s.last, !last.isNumber {
            digits = digits.dropLast()
            switch last {
            case "b", "B": multiplier = 1
            case "k", "K": multiplier = 1 << 10
            case "m", "M": multiplier = 1 << 20
            case "g", "G": multiplier = 1 << 30
            case "t", "T": multiplier = 1 << 40
            default:
                let isNumber = !digits.isEmpty && digits.allSatisfy { $0.isASCII && $0.isNumber }
                throw isNumber ? .unknownSuffix(text) : .notANumber(text)
            }
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }) else { throw .notANumber(text) }
        guard let value = UInt64(digits) else { throw .tooLarge(text, limitSectors: PloopSpec.maxImageSectors) }
        guard value > 0 else { throw .zero(text) }
        guard let m = multiplier else { return value }
        let (bytes, overflow) = value.multipliedReportingOverflow(by: m)
        guard !overflow else { throw .tooLarge(text, limitSectors: PloopSpec.maxImageSectors) }
        guard bytes % PloopSpec.sectorSize == 0 else { throw .notSectorMultiple(text, bytes: bytes) }
        return bytes / PloopSpec.sectorSize
    }

    /// A human size, binary units, for messages ("1 GiB", "768 KiB", "1536 B").
    public static func describe(bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var value = bytes
        var unit = 0
        while value >= 1024, value % 1024 == 0, unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        if unit == 0 && bytes >= 1024 {
            return String(format1: Double(bytes) / 1024, "KiB")
        }
        return "\(value) \(units[unit])"
    }
}

extension String {
    fileprivate var trimmingSpaces: String {
        String(self.drop(while: { $0 == " " }).reversed().drop(while: { $0 == " " }).reversed())
    }

    fileprivate init(format1 value: Double, _ unit: String) {
        let tenths = Int((value * 10).rounded())
        self = "\(tenths / 10).\(tenths % 10) \(unit)"
    }
}
