/// A strict reader of the XML a DiskDescriptor.xml is written in, of our own rather than
/// Foundation's XMLParser: that one traps on some damaged input (a name that is not UTF-8, a
/// processing instruction without data; both found by fuzzing) and leaks a little on every parse.
///
/// It takes well-formed XML 1.0 without a DTD: an optional `<?xml …?>` declaration, comments,
/// elements with attributes (checked, not kept), text with the five predefined entities and
/// character references, CDATA sections. It refuses, with the byte offset and line, anything a
/// conforming parser refuses as not well-formed, plus DTDs (a descriptor has no business
/// declaring entities or pulling in files) and processing instructions. It keeps what the
/// descriptor needs: each element's name, its text (all its character data, in order) and its
/// child elements. The input must be valid UTF-8 already (`DiskDescriptor.firstInvalidUTF8`).
struct DescriptorXML {
    final class Element {
        let name: String
        var text = ""
        var children: [Element] = []
        init(name: String) { self.name = name }
    }

    enum Failure: Error, Equatable {
        /// Not well-formed: what is wrong, at a byte offset and its line (from 1).
        case notWellFormed(String, offset: Int, line: Int)
        /// The text stops inside something: an element (`<Name>`), a comment, the declaration.
        case cutShort(inside: String)
        case empty
        case dtd(offset: Int)
        case processingInstruction(offset: Int)
        /// An encoding other than UTF-8 declared for text that is not plain ASCII.
        case encoding(String)
    }

    /// Deeper nesting than this is refused (a descriptor nests five deep).
    static let maxDepth = 64

    private let bytes: [UInt8]
    private var i = 0
    private var stack: [Element] = []

    private init(_ bytes: [UInt8]) { self.bytes = bytes }

    /// The root element of `bytes`.
    static func parse(_ bytes: [UInt8]) throws(Failure) -> Element {
        var reader = DescriptorXML(bytes)
        return try reader.document()
    }

    // MARK: - The document

    private mutating func document() throws(Failure) -> Element {
        if bytes.isEmpty { throw .empty }
        if starts(with: [0xEF, 0xBB, 0xBF]) { i = 3 }
        if starts(with: "<?xml"), i + 5 < bytes.count, Self.isSpace(bytes[i + 5]) { try declaration() }
        try misc()
        guard i < bytes.count else {
            if bytes[bytes.startIndex...].allSatisfy({ Self.isSpace($0) }) { throw .empty }
            throw .notWellFormed("there is no element", offset: i, line: line(at: i))
        }
        guard bytes[i] == UInt8(ascii: "<"), i + 1 < bytes.count, Self.isNameStart(bytes[i + 1]) else {
            throw wrong("text before the root element")
        }
        let root = try element()
        try misc()
        if i < bytes.count { throw wrong("content after the root element </\(root.name)>") }
        return root
    }

    /// `<?xml version="1.x" [encoding="…"] [standalone="…"]?>`.
    private mutating func declaration() throws(Failure) {
        let start = i
        i += 5
        guard let end = find("?>") else { throw .cutShort(inside: "the <?xml …?> declaration") }
        let attributes = try self.attributes(until: end, in: "the <?xml …?> declaration")
        // version first, then encoding="Name" and standalone="yes|no" if given, in that order.
        let names = attributes.map(\.name)
        guard names.first == "version", Self.isVersion(attributes[0].value),
              ["version", "encoding", "standalone"].filter(names.contains) == names else {
            throw .notWellFormed("the <?xml …?> declaration must give a version first, then only encoding and standalone", offset: start, line: line(at: start))
        }
        if let encoding = attributes.first(where: { $0.name == "encoding" })?.value {
            guard let first = encoding.utf8.first, Self.isLetter(first),
                  encoding.utf8.allSatisfy({ Self.isLetter($0) || Self.isDigit($0) || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-") }) else {
                throw .notWellFormed("the encoding name \"\(encoding)\" is not a name", offset: start, line: line(at: start))
            }
            if !["utf-8", "utf8"].contains(encoding.lowercased()), bytes.contains(where: { $0 >= 0x80 }) { throw .encoding(encoding) }
        }
        if let standalone = attributes.first(where: { $0.name == "standalone" })?.value, standalone != "yes", standalone != "no" {
            throw .notWellFormed("standalone is \"\(standalone)\", not yes or no", offset: start, line: line(at: start))
        }
        i = end + 2
    }

    /// What may stand around the root: white space and comments.
    private mutating func misc() throws(Failure) {
        while i < bytes.count {
            if Self.isSpace(bytes[i]) {
                i += 1
            } else if starts(with: "<!--") {
                try comment()
            } else if starts(with: "<!DOCTYPE") || starts(with: "<!ENTITY") {
                throw .dtd(offset: i)
            } else if starts(with: "<?") {
                throw .processingInstruction(offset: i)
            } else {
                return
            }
        }
    }

    // MARK: - Elements

    /// From the `<` of the root's start tag to the end of its end tag, without recursion.
    private mutating func element() throws(Failure) -> Element {
        var root: Element?
        while true {
            guard i < bytes.count else { throw .cutShort(inside: "<\(stack.last?.name ?? "?")>") }
            if bytes[i] != UInt8(ascii: "<") {
                stack[stack.count - 1].text += try text()
                continue
            }
            if starts(with: "</") {
                try endTag()
                if stack.isEmpty, let root { return root }
            } else if starts(with: "<!--") {
                try comment()
            } else if starts(with: "<![CDATA[") {
                let start = i
                i += 9
                guard let end = find("]]>") else { throw .cutShort(inside: "<\(stack.last?.name ?? "?")>") }
                stack[stack.count - 1].text += try resolved(start + 9, end, references: false)
                i = end + 3
            } else if starts(with: "<!DOCTYPE") || starts(with: "<!ENTITY") {
                throw .dtd(offset: i)
            } else if starts(with: "<?") {
                throw .processingInstruction(offset: i)
            } else {
                let (e, empty) = try startTag()
                if let parent = stack.last { parent.children.append(e) } else { root = e }
                if empty {
                    if stack.isEmpty { return e }
                } else {
                    guard stack.count < Self.maxDepth else { throw wrong("elements nest deeper than \(Self.maxDepth)") }
                    stack.append(e)
                }
            }
        }
    }

    /// `<Name attr="v" …>` or `<Name …/>`; says which.
    private mutating func startTag() throws(Failure) -> (Element, empty: Bool) {
        i += 1
        guard i < bytes.count, Self.isNameStart(bytes[i]) else { throw i < bytes.count ? wrong("'<' that opens no tag") : cut() }
        let name = try self.name()
        var close = i
        while close < bytes.count, bytes[close] != UInt8(ascii: ">") {
            if bytes[close] == UInt8(ascii: "\"") || bytes[close] == UInt8(ascii: "'") {
                // A quoted value may hold '>'.
                let quote = bytes[close]
                close += 1
                while close < bytes.count, bytes[close] != quote { close += 1 }
            }
            close += 1
        }
        guard close < bytes.count else { throw .cutShort(inside: "<\(stack.last?.name ?? name)>") }
        let empty = close > i && bytes[close - 1] == UInt8(ascii: "/")
        _ = try attributes(until: empty ? close - 1 : close, in: "<\(name)>")
        i = close + 1
        return (Element(name: name), empty)
    }

    /// `</Name S?>`, closing the innermost open element.
    private mutating func endTag() throws(Failure) {
        let start = i
        i += 2
        guard i < bytes.count else { throw cut() }
        guard Self.isNameStart(bytes[i]) else { throw wrong("'</' without a name") }
        let name = try self.name()
        while i < bytes.count, Self.isSpace(bytes[i]) { i += 1 }
        guard i < bytes.count else { throw cut() }
        guard bytes[i] == UInt8(ascii: ">") else { throw wrong("</\(name) is not closed by '>'") }
        guard let open = stack.last else { throw .notWellFormed("</\(name)> closes nothing", offset: start, line: line(at: start)) }
        guard open.name == name else {
            throw .notWellFormed("</\(name)> closes <\(open.name)>", offset: start, line: line(at: start))
        }
        stack.removeLast()
        i += 1
    }

    /// Attributes from `i` up to `end` (exclusive), each `S Name S? = S? "value"`, no name
    /// twice; their values with references resolved.
    private mutating func attributes(until end: Int, in tag: String) throws(Failure) -> [(name: String, value: String)] {
        var found: [(name: String, value: String)] = []
        while true {
            let spaced = i < end && Self.isSpace(bytes[i])
            while i < end, Self.isSpace(bytes[i]) { i += 1 }
            if i == end { return found }
            guard spaced else { throw wrong("no space before an attribute of \(tag)") }
            guard Self.isNameStart(bytes[i]) else { throw wrong("\(tag) holds something that is not an attribute") }
            let name = try self.name(until: end)
            while i < end, Self.isSpace(bytes[i]) { i += 1 }
            guard i < end, bytes[i] == UInt8(ascii: "=") else { throw wrong("attribute \(name) of \(tag) has no '='") }
            i += 1
            while i < end, Self.isSpace(bytes[i]) { i += 1 }
            guard i < end, bytes[i] == UInt8(ascii: "\"") || bytes[i] == UInt8(ascii: "'") else {
                throw wrong("attribute \(name) of \(tag) has no quoted value")
            }
            let quote = bytes[i]
            i += 1
            let valueStart = i
            while i < end, bytes[i] != quote {
                if bytes[i] == UInt8(ascii: "<") { throw wrong("'<' in the value of attribute \(name)") }
                i += 1
            }
            guard i < end else { throw wrong("the value of attribute \(name) of \(tag) is not closed") }
            let value = try resolved(valueStart, i)
            i += 1
            if found.contains(where: { $0.name == name }) { throw wrong("attribute \(name) appears twice in \(tag)") }
            found.append((name, value))
        }
    }

    // MARK: - Text

    /// Character data up to the next `<` (or the end), references resolved.
    private mutating func text() throws(Failure) -> String {
        let start = i
        while i < bytes.count, bytes[i] != UInt8(ascii: "<") {
            if bytes[i] == UInt8(ascii: "]"), starts(with: "]]>") { throw wrong("']]>' outside a CDATA section") }
            i += 1
        }
        return try resolved(start, i)
    }

    /// `bytes[start..<end]` as text: every character allowed in XML, `&…;` references resolved
    /// (not in a CDATA section), line ends normalised to LF as XML requires.
    private func resolved(_ start: Int, _ end: Int, references: Bool = true) throws(Failure) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(end - start)
        var k = start
        while k < end {
            let b = bytes[k]
            if b == UInt8(ascii: "&"), references {
                guard let semicolon = bytes[k..<min(end, k + 40)].firstIndex(of: UInt8(ascii: ";")) else {
                    throw .notWellFormed("'&' that starts no reference", offset: k, line: line(at: k))
                }
                let ref = Array(bytes[(k + 1)..<semicolon])
                guard let scalar = Self.reference(ref) else {
                    throw .notWellFormed("&\(String(decoding: ref, as: UTF8.self)); is not a reference XML defines", offset: k, line: line(at: k))
                }
                out += Array(String(Character(scalar)).utf8)
                k = semicolon + 1
                continue
            }
            try checkCharacter(at: k)
            if b == 0x0D {
                out.append(0x0A)
                if k + 1 < end, bytes[k + 1] == 0x0A { k += 1 }
            } else {
                out.append(b)
            }
            k += 1
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// XML 1.0 characters: no C0 controls but tab, LF and CR; not U+FFFE or U+FFFF.
    private func checkCharacter(at k: Int) throws(Failure) {
        let b = bytes[k]
        if b < 0x20, b != 0x09, b != 0x0A, b != 0x0D {
            throw .notWellFormed("control character 0x\(String(b, radix: 16)) is not allowed in XML", offset: k, line: line(at: k))
        }
        if b == 0xEF, k + 2 < bytes.count, bytes[k + 1] == 0xBF, bytes[k + 2] >= 0xBE {
            throw .notWellFormed("U+FFFE and U+FFFF are not allowed in XML", offset: k, line: line(at: k))
        }
    }

    /// The character a reference names: `amp`, `lt`, `gt`, `quot`, `apos`, `#N`, `#xH`.
    static func reference(_ ref: [UInt8]) -> Unicode.Scalar? {
        switch String(decoding: ref, as: UTF8.self) {
        case "amp": return "&"
        case "lt": return "<"
        case "gt": return ">"
        case "quot": return "\""
        case "apos": return "'"
        default: break
        }
        guard ref.count >= 2, ref[0] == UInt8(ascii: "#") else { return nil }
        let hex = ref[1] == UInt8(ascii: "x")
        let digits = ref[(hex ? 2 : 1)...]
        guard !digits.isEmpty else { return nil }
        var value: UInt32 = 0
        for d in digits {
            guard let v = hexValue(d), hex || v < 10 else { return nil }
            value = value * (hex ? 16 : 10) + UInt32(v)
            if value > 0x10FFFF { return nil }
        }
        guard value == 0x9 || value == 0xA || value == 0xD || (0x20...0xD7FF).contains(value)
            || (0xE000...0xFFFD).contains(value) || (0x10000...0x10FFFF).contains(value) else { return nil }
        return Unicode.Scalar(value)
    }

    private static func hexValue(_ b: UInt8) -> UInt8? {
        switch b {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): b - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): b - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): b - UInt8(ascii: "A") + 10
        default: nil
        }
    }

    // MARK: - Pieces

    /// `<!-- … -->`; `--` inside is not allowed.
    private mutating func comment() throws(Failure) {
        let start = i
        i += 4
        guard let end = find("--") else { throw .cutShort(inside: "a comment") }
        guard end + 2 < bytes.count else { throw .cutShort(inside: "a comment") }
        guard bytes[end + 2] == UInt8(ascii: ">") else { throw .notWellFormed("'--' inside a comment", offset: end, line: line(at: end)) }
        for k in (start + 4)..<end { try checkCharacter(at: k) }
        i = end + 3
    }

    private mutating func name(until end: Int? = nil) throws(Failure) -> String {
        let limit = end ?? bytes.count
        let start = i
        while i < limit, Self.isNameByte(bytes[i]) { i += 1 }
        return String(decoding: bytes[start..<i], as: UTF8.self)
    }

    /// A version number as expat and libxml2 take it: any non-empty run of name characters
    /// (both read "1.1" or ".0" as XML 1.0, libxml2 with a warning).
    static func isVersion(_ v: String) -> Bool { !v.isEmpty && v.utf8.allSatisfy(isNameByte) }

    static func isLetter(_ b: UInt8) -> Bool { (b >= UInt8(ascii: "a") && b <= UInt8(ascii: "z")) || (b >= UInt8(ascii: "A") && b <= UInt8(ascii: "Z")) }
    static func isDigit(_ b: UInt8) -> Bool { b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9") }

    static func isSpace(_ b: UInt8) -> Bool { b == 0x20 || b == 0x09 || b == 0x0A || b == 0x0D }

    /// Name start characters: letters, `_`, `:` and every non-ASCII character (the input is valid
    /// UTF-8, and XML allows nearly all of them).
    static func isNameStart(_ b: UInt8) -> Bool {
        isLetter(b) || b == UInt8(ascii: "_") || b == UInt8(ascii: ":") || b >= 0x80
    }

    static func isNameByte(_ b: UInt8) -> Bool {
        isNameStart(b) || isDigit(b) || b == UInt8(ascii: "-") || b == UInt8(ascii: ".")
    }

    private func starts(with s: StaticString) -> Bool {
        let n = s.utf8CodeUnitCount
        guard i + n <= bytes.count else { return false }
        return s.withUTF8Buffer { p in
            for k in 0..<n where bytes[i + k] != p[k] { return false }
            return true
        }
    }

    private func starts(with prefix: [UInt8]) -> Bool { bytes[i...].starts(with: prefix) }

    /// The offset of the next `s` at or after `i`.
    private func find(_ s: StaticString) -> Int? {
        let n = s.utf8CodeUnitCount
        return s.withUTF8Buffer { p -> Int? in
            var k = i
            while k + n <= bytes.count {
                if bytes[k] == p[0], (1..<n).allSatisfy({ bytes[k + $0] == p[$0] }) { return k }
                k += 1
            }
            return nil
        }
    }

    private func line(at offset: Int) -> Int {
        1 + bytes[..<min(offset, bytes.count)].reduce(0) { $0 + ($1 == 0x0A ? 1 : 0) }
    }

    private func wrong(_ what: String) -> Failure { .notWellFormed(what, offset: i, line: line(at: i)) }

    private func cut() -> Failure { .cutShort(inside: "<\(stack.last?.name ?? "?")>") }
}
