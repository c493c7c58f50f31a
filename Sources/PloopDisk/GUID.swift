import Foundation

/// A snapshot or image GUID as DiskDescriptor.xml stores it: braced, the case kept as it was
/// given (the original stores what the user typed), compared and hashed without regard to case.
public struct GUID: Hashable, Sendable, CustomStringConvertible, Codable {
    /// The braced text, as stored.
    public let text: String

    /// The top delta's GUID in every descriptor the original writes (a Parallels marker).
    public static let top = GUID(uncheckedBraced: "{5fbaabe3-6958-40ff-92a7-860e329aab41}")
    /// The base image's ParentGUID.
    public static let none = GUID(uncheckedBraced: "{00000000-0000-0000-0000-000000000000}")

    init(uncheckedBraced text: String) { self.text = text }

    /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, with or without braces, in any case.
    public init?(parsing raw: String) {
        var s = Substring(raw.trimmingCharacters(in: .whitespaces))
        if s.hasPrefix("{") || s.hasSuffix("}") {
            guard s.hasPrefix("{"), s.hasSuffix("}") else { return nil }
            s = s.dropFirst().dropLast()
        }
        let groups = s.split(separator: "-", omittingEmptySubsequences: false)
        guard groups.map(\.count) == [8, 4, 4, 4, 12], groups.allSatisfy({ $0.allSatisfy(\.isHexDigit) && $0.allSatisfy(\.isASCII) }) else {
            return nil
        }
        text = "{\(s)}"
    }

    /// A new random (version 4) GUID, lower case.
    public static func random() -> GUID { GUID(uncheckedBraced: "{\(UUID().uuidString.lowercased())}") }

    /// The GUID in lower case, for comparisons.
    public var key: String { text.lowercased() }
    public static func == (a: GUID, b: GUID) -> Bool { a.key == b.key }
    public func hash(into h: inout Hasher) { h.combine(key) }
    public var description: String { text }
    public var isNone: Bool { self == .none }

    public init(from decoder: any Decoder) throws {
        let s = try decoder.singleValueContainer().decode(String.self)
        guard let g = GUID(parsing: s) else { throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not a GUID: \(s)")) }
        self = g
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(text)
    }
}
