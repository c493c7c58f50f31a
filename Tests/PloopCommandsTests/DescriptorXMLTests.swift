import Foundation
@testable import PloopDisk
import PloopImage
import PloopTestSupport
import Testing

/// Our XML reader for DiskDescriptor.xml (DescriptorXML): the cases XML defines, each refusal with
/// where it is, and, against Python's expat as an independent parser, thousands of damaged
/// descriptors: we accept exactly what expat accepts (less DTDs and processing instructions,
/// which we refuse on purpose) and read the same elements and text from it.
@Suite struct DescriptorXMLTests {
    /// The tree as a nested array [name, text, [children…]], the form the expat script prints.
    static func tree(_ e: DescriptorXML.Element) -> [Any] { [e.name, e.text, e.children.map(tree)] }

    static func parse(_ s: String) throws(DescriptorXML.Failure) -> DescriptorXML.Element { try DescriptorXML.parse(Array(s.utf8)) }

    @Test func readsWhatXMLDefines() throws {
        let e = try Self.parse("""
            \u{FEFF}<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
            <!-- a comment -->
            <r a="1" b='x &amp; y &#62;'>x&amp;&lt;&gt;&quot;&apos;&#65;&#x42;&#0067;<e/><e  k="v" />\r\ny\rz<![CDATA[<raw>&amp;]]><!--c--></r >
            <!-- after -->

            """)
        #expect(e.name == "r")
        #expect(e.text == "x&<>\"'ABC\ny\nz<raw>&amp;")
        #expect(e.children.map(\.name) == ["e", "e"])
        #expect(try Self.parse("<a><b>1</b><c><d>2</d></c></a>").children[1].children[0].text == "2")
        #expect(try Self.parse("<a>&#x10FFFF;</a>").text == "\u{10FFFF}")
    }

    @Test(arguments: [
        ("", "empty"),
        ("  \n", "empty"),
        ("<a>", "cut:<a>"),
        ("<a><b>x</b>", "cut:<a>"),
        ("<a><b x=\"1", "cut:<a>"),
        ("<a></", "cut:<a>"),
        ("<!-- x", "cut:a comment"),
        ("<?xml version=\"1.0\"", "cut:the <?xml …?> declaration"),
        ("<a><![CDATA[x</a>", "cut:<a>"),
        ("x<a/>", "text before the root element"),
        ("\u{1}\u{2}garbage", "text before the root element"),
        ("<a/><b/>", "content after the root element"),
        ("<a/>x", "content after the root element"),
        ("<a></b>", "</b> closes <a>"),
        ("<a>&foo;</a>", "&foo; is not a reference"),
        ("<a>&#0;</a>", "&#0; is not a reference"),
        ("<a>&#xD800;</a>", "&#xD800; is not a reference"),
        ("<a>&#x110000;</a>", "is not a reference"),
        ("<a>& b</a>", "'&' that starts no reference"),
        ("<a>\u{1}</a>", "control character 0x1"),
        ("<a>x]]>y</a>", "']]>' outside a CDATA section"),
        ("<a x=\"1\" x=\"2\"/>", "attribute x appears twice"),
        ("<a x=1/>", "has no quoted value"),
        ("<a x=\"1\"y=\"2\"/>", "no space before an attribute"),
        ("<a x=\"<\"/>", "'<' in the value"),
        ("<a x/>", "has no '='"),
        ("<a/ >", "no space before an attribute"),
        ("< a/>", "text before the root element"),
        ("<a>< b/></a>", "'<' that opens no tag"),
        ("<a></a b>", "</a is not closed by '>'"),
        ("<!-- a -- b --><a/>", "'--' inside a comment"),
        ("<?xml version=\"\"?><a/>", "must give a version"),
        ("<?xml?><a/>", "pi:0"),
        ("<?xml encoding=\"UTF-8\" version=\"1.0\"?><a/>", "must give a version"),
        ("<?xml version=\"1.0\" standalone=\"maybe\"?><a/>", "not yes or no"),
        ("<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><a>\u{E9}</a>", "encoding:ISO-8859-1"),
        ("<?xml version=\"1.0\"?><!DOCTYPE a><a/>", "dtd:21"),
        ("<a><!ENTITY e \"x\"></a>", "dtd:3"),
        ("<?x?><a/>", "pi:0"),
        ("<a><?php ?></a>", "pi:3"),
        (" <?xml version=\"1.0\"?><a/>", "pi:1"),
        (String(repeating: "<a>", count: 65) + String(repeating: "</a>", count: 65), "nest deeper than 64"),
    ])
    func refusesWhatIsNotWellFormed(_ input: String, _ expect: String) {
        do {
            let e = try Self.parse(input)
            Issue.record("accepted \(input.debugDescription) as <\(e.name)>")
        } catch {
            let said: String = switch error {
            case .empty: "empty"
            case .cutShort(let inside): "cut:\(inside)"
            case .notWellFormed(let what, let offset, let line):
                "\(what) (line \(line), byte \(offset))"
            case .dtd(let offset): "dtd:\(offset)"
            case .processingInstruction(let offset): "pi:\(offset)"
            case .encoding(let name): "encoding:\(name)"
            }
            #expect(said.contains(expect), "\(input.debugDescription): \(said)")
        }
    }

    /// Where the damage is: the line and the byte offset of what is wrong.
    @Test func saysTheLineAndByte() throws {
        let text = "<?xml version=\"1.0\"?>\n<a>\n  <b>&bad;</b>\n</a>\n"
        #expect(throws: DescriptorXML.Failure.notWellFormed("&bad; is not a reference XML defines", offset: 31, line: 3)) { try Self.parse(text) }
        let damaged = Data("<?xml version=\"1.0\"?>\n<Parallels_disk_image>\n<Disk_Parameters></Disk_parameters>".utf8)
        #expect(throws: DiskError.malformed("DD.xml", "it is not well-formed XML (line 3, byte 62: </Disk_parameters> closes <Disk_Parameters>)")) {
            try DiskDescriptor.parse(damaged, path: "DD.xml")
        }
    }

    /// Seeded damage to the original's recorded descriptors, judged by expat: the same verdict
    /// on every input, the same tree on every accepted one.
    @Test(.enabled(if: TestSupport.which("python3") != nil, "python3 is missing (expat is the independent judge)"))
    func agreesWithExpatOnDamagedDescriptors() throws {
        let fixtures = TestSupport.packageRoot.appendingPathComponent("fixtures/original-v7").path
        let files = (FileManager.default.enumerator(atPath: fixtures)?.allObjects as? [String] ?? []).filter { $0.hasSuffix(".xml") }.sorted()
        try #require(files.count > 10)
        let originals = try files.map { try [UInt8](Data(contentsOf: URL(fileURLWithPath: fixtures + "/" + $0))) }
        var seed: UInt64 = 16
        func next() -> UInt64 { CrashStates.next(&seed) }
        let alphabet = Array("<>/&;#x=\"' !?-[]CDATAab01\t\n\r".utf8) + [0x01]
        var inputs: [[UInt8]] = originals
        while inputs.count < 3000 {
            var b = originals[Int(next() % UInt64(originals.count))]
            for _ in 0..<(1 + Int(next() % 3)) {
                let at = Int(next() % UInt64(b.count))
                switch next() % 5 {
                case 0: b[at] = alphabet[Int(next() % UInt64(alphabet.count))]
                case 1: b.remove(at: at)
                case 2: b.insert(alphabet[Int(next() % UInt64(alphabet.count))], at: at)
                case 3: b = Array(b[..<at])
                default:
                    let n = min(b.count - at, 1 + Int(next() % 24))
                    b.insert(contentsOf: b[at..<(at + n)], at: at)
                }
            }
            // What we refuse on purpose (expat takes them): DTDs, processing instructions.
            let text = String(decoding: b, as: UTF8.self)
            if text.contains("<!DOCTYPE") || text.contains("<!ENTITY") || text.dropFirst().contains("<?") { continue }
            inputs.append(b)
        }
        let expat = try Self.expat(inputs)
        try #require(expat.count == inputs.count)
        var accepted = 0
        for (k, input) in inputs.enumerated() {
            let ours: String
            do {
                let tree = try DescriptorXML.parse(input)
                let json = try JSONSerialization.data(withJSONObject: Self.tree(tree))
                ours = String(decoding: json, as: UTF8.self)
                accepted += 1
            } catch {
                ours = "error"
            }
            let theirs = expat[k]
            if ours == "error" || theirs == "error" {
                #expect(ours == theirs, "input \(k): ours \(ours.prefix(80)), expat \(theirs.prefix(80)): \(String(decoding: input, as: UTF8.self).debugDescription)")
            } else {
                // Same trees: compare them decoded (JSON escapes may differ).
                let a = try JSONSerialization.jsonObject(with: Data(ours.utf8)) as? NSArray
                let b = try JSONSerialization.jsonObject(with: Data(theirs.utf8)) as? NSArray
                #expect(a == b, "input \(k): trees differ: ours \(ours.prefix(200)) expat \(theirs.prefix(200))")
            }
        }
        // The damage must leave both kinds, or the comparison proves little.
        #expect(accepted > 300 && accepted < inputs.count - 300, "accepted \(accepted) of \(inputs.count)")
    }

    /// One line per input: expat's tree as JSON, or "error".
    static func expat(_ inputs: [[UInt8]]) throws -> [String] {
        let script = """
            import sys, json, base64, xml.parsers.expat
            for line in sys.stdin:
                data = base64.b64decode(line.strip())
                root = []; stack = []
                def start(name, attrs):
                    e = [name, "", []]
                    (stack[-1][2] if stack else root).append(e); stack.append(e)
                def end(name): stack.pop()
                def chars(t): stack[-1][1] += t
                p = xml.parsers.expat.ParserCreate()
                p.StartElementHandler = start; p.EndElementHandler = end; p.CharacterDataHandler = chars
                try:
                    p.Parse(data, True)
                    print(json.dumps(root[0]))
                except Exception:
                    print("error")
            """
        let dir = try ScratchDirectory("ploop-expat")
        let lines = inputs.map { Data($0).base64EncodedString() }.joined(separator: "\n") + "\n"
        _ = FileManager.default.createFile(atPath: dir.file("in"), contents: Data(lines.utf8))
        let r = try TestSupport.run("/bin/sh", ["-c", "exec python3 -c \"$0\" < \"$1\"", script, dir.file("in")])
        #expect(r.code == 0, "\(r.stderr)")
        return r.stdout.split(separator: "\n", omittingEmptySubsequences: false).dropLast().map(String.init)
    }
}
