import SystemPackage

/// File names are bytes; Swift strings are Unicode. A name that is not valid UTF-8 (Linux allows
/// any byte but `/` and NUL) must still reach the system call exactly as the user typed it, so
/// each byte of an invalid sequence is carried inside the `String` as one code point of the last
/// 256 of plane 16's private use area (U+10FF00 + byte), and turned back into that byte where a
/// path meets the kernel. Valid UTF-8 passes through unchanged. (A name that really holds those
/// private-use code points, which no text uses, would be read as the bytes they stand for.)
public enum RawPath {
    static let escapeBase: UInt32 = 0x10FF00

    /// A `String` for the bytes of a path (argv, readdir), invalid bytes escaped.
    public static func decode<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
        if let s = String(validating: bytes, as: UTF8.self) { return s }
        var out = String.UnicodeScalarView()
        var i = bytes.startIndex
        while i < bytes.endIndex {
            var iterator = bytes[i...].makeIterator()
            var parser = Unicode.UTF8.ForwardParser()
            switch parser.parseScalar(from: &iterator) {
            case .valid(let encoded):
                out.append(Unicode.UTF8.decode(encoded))
                i = bytes.index(i, offsetBy: encoded.count)
            case .error(let length):
                for b in bytes[i..<bytes.index(i, offsetBy: length)] { out.append(Unicode.Scalar(escapeBase + UInt32(b))!) }
                i = bytes.index(i, offsetBy: length)
            case .emptyInput:
                i = bytes.endIndex
            }
        }
        return String(out)
    }

    /// The bytes a path string stands for.
    public static func bytes(_ path: String) -> [UInt8] {
        guard needsUnescaping(path) else { return Array(path.utf8) }
        var out: [UInt8] = []
        for scalar in path.unicodeScalars {
            if scalar.value >= escapeBase {
                out.append(UInt8(scalar.value - escapeBase))
            } else {
                out.append(contentsOf: String(scalar).utf8)
            }
        }
        return out
    }

    /// Calls `body` with the path as the NUL-terminated bytes the kernel is to see.
    public static func withCString<R>(_ path: String, _ body: (UnsafePointer<CChar>) throws -> R) rethrows -> R {
        guard needsUnescaping(path) else { return try path.withCString(body) }
        let raw = bytes(path).map { CChar(bitPattern: $0) } + [0]
        return try raw.withUnsafeBufferPointer { try body($0.baseAddress!) }
    }

    /// The path as swift-system's `FilePath`, with the bytes the kernel is to see.
    public static func filePath(_ path: String) -> FilePath { withCString(path) { FilePath(platformString: $0) } }

    static func needsUnescaping(_ path: String) -> Bool {
        path.utf8.contains(0xF4) && path.unicodeScalars.contains { $0.value >= escapeBase }
    }
}
