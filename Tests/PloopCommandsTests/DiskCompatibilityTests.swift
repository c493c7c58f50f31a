import Foundation
import PloopDisk
import PloopFormat
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

/// The original's recorded runs (fixtures/original-v7, from ploop v7.0.165), replayed with our
/// tool: the same descriptor before, the same command, then the descriptor (byte for byte, and
/// as a tree read by Python's xml.etree), the snapshot list and the folder listing must equal the
/// original's, with file names the command made itself (random GUIDs) matched by order. The
/// recorded images were empty; ours carry a pattern per delta (written with qemu-io where it is
/// installed), and the disk's content after the command must be what the command means.
struct DiskCompatibilityTests {
    static let fixtures = TestSupport.packageRoot.appendingPathComponent("fixtures/original-v7").path
    static let g1 = "{11111111-1111-4111-8111-111111111111}"
    static let g2 = "{22222222-2222-4222-8222-222222222222}"
    static let top = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"

    struct Case: Sendable, CustomTestStringConvertible {
        var folder: String
        var name: String
        var commands: [[String]]
        /// Whose chain (in the descriptor before) the disk reads as afterwards; nil: refused.
        var contentOf: String?
        /// Where the original is buggy and we do better on purpose (docs/DISKS.md): the outcome is
        /// checked, not compared with the recording.
        var differs = false
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(folder: "04a-snapshot-delete", name: "del-mid", commands: [["snapshot-delete", "-u", g2]], contentOf: top),
        Case(folder: "04a-snapshot-delete", name: "del-base", commands: [["snapshot-delete", "-u", g1]], contentOf: top),
        Case(folder: "04a-snapshot-delete", name: "del-top", commands: [["snapshot-delete", "-u", top]], contentOf: g2),
        Case(folder: "04a-snapshot-delete", name: "del-unknown", commands: [["snapshot-delete", "-u", "{99999999-9999-4999-8999-999999999999}"]], contentOf: nil),
        Case(folder: "04a-snapshot-delete", name: "del-nobraces", commands: [["snapshot-delete", "-u", "22222222-2222-4222-8222-222222222222"]], contentOf: top),
        Case(folder: "04a-snapshot-delete", name: "del-twice", commands: [["snapshot-delete", "-u", g2], ["snapshot-delete", "-u", g1]], contentOf: top),
        Case(folder: "04a-snapshot-delete", name: "del-case", commands: [["snapshot-delete", "-u", "{abcdef01-abcd-4bcd-8bcd-abcdef012345}"]], contentOf: top),
        Case(folder: "04b-snapshot-switch", name: "sw-g1", commands: [["snapshot-switch", "-u", g1]], contentOf: g1),
        Case(folder: "04b-snapshot-switch", name: "sw-g2", commands: [["snapshot-switch", "-u", g2]], contentOf: g2),
        Case(folder: "04b-snapshot-switch", name: "sw-top", commands: [["snapshot-switch", "-u", top]], contentOf: nil),
        Case(folder: "04b-snapshot-switch", name: "sw-unknown", commands: [["snapshot-switch", "-u", "{99999999-9999-4999-8999-999999999999}"]], contentOf: nil),
        Case(folder: "04b-snapshot-switch", name: "sw-g1-twice", commands: [["snapshot-switch", "-u", g1], ["snapshot-switch", "-u", g2]], contentOf: g2),
        // The original's -D keeps the old top under the top GUID beside the new one: two images with
        // one GUID, a descriptor it then misreads. We drop the old top, as without -D.
        Case(folder: "04b-snapshot-switch", name: "sw-D", commands: [["snapshot-switch", "-D", "-u", g1]], contentOf: g1, differs: true),
        // The original compares the top GUID case-sensitively and switches "away" from the top to
        // itself, leaving a top whose parent no longer exists. We refuse.
        Case(folder: "04b-snapshot-switch", name: "sw-top-upper", commands: [["snapshot-switch", "-u", "{5FBAABE3-6958-40FF-92A7-860E329AAB41}"]], contentOf: nil),
        Case(folder: "04b-snapshot-switch", name: "sw-case", commands: [["snapshot-switch", "-u", "{abcdef01-abcd-4bcd-8bcd-abcdef012345}"]], contentOf: "{ABCDEF01-ABCD-4BCD-8BCD-ABCDEF012345}"),
        Case(folder: "04c-snapshot-merge", name: "mg-default", commands: [["snapshot-merge"]], contentOf: top),
        Case(folder: "04c-snapshot-merge", name: "mg-g2", commands: [["snapshot-merge", "-u", g2]], contentOf: top),
        Case(folder: "04c-snapshot-merge", name: "mg-g1", commands: [["snapshot-merge", "-u", g1]], contentOf: nil),
        Case(folder: "04c-snapshot-merge", name: "mg-top", commands: [["snapshot-merge", "-u", top]], contentOf: top),
        Case(folder: "04c-snapshot-merge", name: "mg-all", commands: [["snapshot-merge", "-A"]], contentOf: top),
        Case(folder: "04c-snapshot-merge", name: "mg-unknown", commands: [["snapshot-merge", "-u", "{99999999-9999-4999-8999-999999999999}"]], contentOf: nil),
        Case(folder: "04c-snapshot-merge", name: "mg-newdelta", commands: [["snapshot-merge", "-u", g2, "-n", "@/merged.hds"]], contentOf: top),
        Case(folder: "04c-snapshot-merge", name: "mg-uA", commands: [["snapshot-merge", "-A", "-u", g2]], contentOf: nil),
        Case(folder: "04c-snapshot-merge", name: "mg-case", commands: [["snapshot-merge", "-u", "{abcdef01-abcd-4bcd-8bcd-abcdef012345}"]], contentOf: top),
    ]

    /// Fill byte of cluster `c` in the image at position `k` of the descriptor (each delta writes
    /// clusters k, k+1 and 100+k: every level overrides some of the one below).
    static func fill(_ k: Int) -> UInt8 { UInt8(0x21 + k) }
    static func clusters(_ k: Int) -> [UInt64] { [UInt64(k), UInt64(k + 1), UInt64(100 + k)] }

    /// The disk folder of a case, as before the command: the recorded descriptor and an image per
    /// File, 1 GiB of 1 MiB clusters (as recorded), with the pattern.
    static func stage(_ c: Case) throws -> (ScratchDirectory, String, DiskDescriptor) {
        let root = try ScratchDirectory("ploop-compat")
        let disk = root.file(c.name)
        try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: false)
        let before = try Data(contentsOf: URL(fileURLWithPath: "\(fixtures)/\(c.folder)/\(c.name).before.xml"))
        _ = FileManager.default.createFile(atPath: disk + "/DiskDescriptor.xml", contents: before)
        let d = try DiskDescriptor.parse(before, path: "before")
        for (k, image) in d.images.enumerated() {
            let p = disk + "/" + image.file
            let r = InProcess.ploop("init", "--no-descriptor", "-s", "1g", "-b", "2048", p)
            precondition(r.code == 0, "\(r)")
            try write(p, clusters(k), fill(k))
        }
        return (root, disk, d)
    }

    static func write(_ path: String, _ clusters: [UInt64], _ byte: UInt8) throws {
        if let qemuIO = TestSupport.which("qemu-io") {
            for c in clusters {
                let r = try TestSupport.run(qemuIO, ["-f", "parallels", "-c", "write -P \(byte) \(c << 20) 1M", path])
                precondition(r.code == 0, "\(r)")
            }
            // qemu leaves CIF_Empty set; our check repairs it and nothing else.
            _ = InProcess.ploop("check", "-f", path)
            return
        }
        let image = try Ploop1Image(file: try ImagePath.open(path, write: true), writable: true)
        let data = [UInt8](repeating: byte, count: image.clusterBytes)
        for c in clusters { try data.withUnsafeBytes { try image.write(cluster: ClusterIndex(c), data: $0) } }
        try image.close()
    }

    /// cluster → fill byte the chain (base first) shows, read from the images.
    static func content(_ paths: [String]) throws -> [UInt64: UInt8] {
        var out: [UInt64: UInt8] = [:]
        for p in paths {
            let image = try Ploop1Image(file: try ImagePath.open(p, write: false), writable: false)
            var b = [UInt8](repeating: 0, count: image.clusterBytes)
            for (c, _) in image.allocatedClusters() {
                _ = try b.withUnsafeMutableBytes { try image.read(cluster: c, into: $0) }
                #expect(Set(b).count == 1, "cluster \(c.value) of \(p) is not one byte")
                out[c.value] = b[0]
            }
        }
        return out
    }

    /// New file names (random GUIDs the command made) replaced by NEW1, NEW2… in order of appearance.
    static func normalize(_ text: String, known: Set<String>, dir: String) -> String {
        var out = text.replacingOccurrences(of: dir, with: "DIR")
        var seen: [String: String] = [:]
        let pattern = try! NSRegularExpression(pattern: "root\\.hds\\.\\{[0-9a-fA-F-]{36}\\}")
        for m in pattern.matches(in: out, range: NSRange(out.startIndex..., in: out)).reversed() {
            let r = Range(m.range, in: out)!
            let name = String(out[r])
            guard !known.contains(name) else { continue }
            _ = seen[name] ?? { seen[name] = "NEW"; return "" }()
            out.replaceSubrange(r, with: "NEW")
        }
        return out
    }

    /// The tree as Python's xml.etree sees it: one line per element, its path and text.
    static func pythonTree(_ xml: String) throws -> String {
        let script = """
            import sys, xml.etree.ElementTree as ET
            def walk(e, path):
                p = path + "/" + e.tag
                print(p, (e.text or "").strip())
                for c in e: walk(c, p)
            walk(ET.fromstring(sys.stdin.read()), "")
            """
        let dir = try ScratchDirectory("ploop-py")
        _ = FileManager.default.createFile(atPath: dir.file("in.xml"), contents: Data(xml.utf8))
        let r = try TestSupport.run("/bin/sh", ["-c", "exec python3 -c \"$0\" < \"$1\"", script, dir.file("in.xml")])
        #expect(r.code == 0, "\(r)")
        return r.stdout
    }

    /// The stdout the original printed for `snapshot-list <case>/DiskDescriptor.xml` after the command.
    static func recordedList(_ c: Case) throws -> String? {
        let cmds = try String(contentsOfFile: "\(fixtures)/\(c.folder)/CMDS.txt", encoding: .utf8)
        guard let at = cmds.range(of: "$ ploop snapshot-list \(c.name)/DiskDescriptor.xml\n--- stdout\n") else { return nil }
        let rest = cmds[at.upperBound...]
        guard let end = rest.range(of: "--- stderr") else { return nil }
        return String(rest[..<end.lowerBound])
    }

    @Test(.enabled(if: TestSupport.which("python3") != nil, "python3 is missing (the independent XML reader)"), arguments: cases)
    func replaysTheOriginal(_ c: Case) throws {
        let (root, disk, before) = try Self.stage(c)
        let known = Set(before.images.map(\.file))
        let files = { () throws -> [String] in try FileManager.default.contentsOfDirectory(atPath: disk).filter { !$0.hasSuffix(".lck") }.sorted() }
        let snapshotBefore = try ScratchDirectoryState(disk)
        var ran: TestSupport.Result?
        for cmd in c.commands {
            let args = cmd.map { $0.replacingOccurrences(of: "@", with: disk) } + [disk + "/DiskDescriptor.xml"]
            ran = try TestSupport.ploopLimited(args, cwd: root.path)
            if ran?.code != 0 { break }
        }
        let last = try #require(ran)
        guard let from = c.contentOf else {
            #expect(last.code != 0, "\(last)")
            #expect(last.stderr.split(separator: "\n").count == 1, "\(last)")
            #expect(try ScratchDirectoryState(disk) == snapshotBefore, "a refused command changed files")
            return
        }
        #expect(last.code == 0, "\(last)")
        let ours = try String(contentsOfFile: disk + "/DiskDescriptor.xml", encoding: .utf8)
        if c.differs {
            try Self.expectContent(ours, disk: disk, before: before, from: from)
            return
        }
        let theirs = try String(contentsOfFile: "\(Self.fixtures)/\(c.folder)/\(c.name).after.xml", encoding: .utf8)
        // Byte for byte, new file names aside.
        #expect(Self.normalize(ours, known: known, dir: disk) == Self.normalize(theirs, known: known, dir: "DIR"), "descriptor differs")
        // And as a second reader sees it.
        #expect(Self.normalize(try Self.pythonTree(ours), known: known, dir: disk) == Self.normalize(try Self.pythonTree(theirs), known: known, dir: "DIR"))
        // The folder holds the same files.
        let recordedFiles = try String(contentsOfFile: "\(Self.fixtures)/\(c.folder)/\(c.name).files-after.txt", encoding: .utf8)
            .split(separator: "\n").map(String.init).filter { !$0.hasSuffix(".lck") }
        #expect(try files().map { Self.normalize($0, known: known, dir: disk) }.sorted() == recordedFiles.map { Self.normalize($0, known: known, dir: "DIR") }.sorted())
        // The snapshot list, byte for byte.
        if let recorded = try Self.recordedList(c) {
            let list = InProcess.ploop("snapshot-list", disk + "/DiskDescriptor.xml")
            #expect(Self.normalize(list.stdout, known: known, dir: disk) == Self.normalize(recorded, known: known, dir: "DIR/\(c.folder)/\(c.name)").replacingOccurrences(of: "DIR/\(c.folder)/\(c.name)", with: "DIR"))
        }
        try Self.expectContent(ours, disk: disk, before: before, from: from)
    }

    /// The data: what the command means, read through the new chain; every image checks clean.
    static func expectContent(_ ours: String, disk: String, before: DiskDescriptor, from: String) throws {
        let after = try DiskDescriptor.parse(Data(ours.utf8), path: "after")
        let chainAfter = after.chain().reversed().map { disk + "/" + after.image($0)!.file }
        let chainBefore = before.chain(from: GUID(parsing: from)!).reversed().map { g in before.images.firstIndex { $0.guid == g }! }
        var expected: [UInt64: UInt8] = [:]
        for k in chainBefore { for cl in clusters(k) { expected[cl] = fill(k) } }
        #expect(try content(chainAfter) == expected)
        let check = InProcess.ploop("check", "-f", "-r", disk + "/DiskDescriptor.xml")
        #expect(check.code == 0, "\(check)")
        if let qemuImg = TestSupport.which("qemu-img") {
            for p in chainAfter {
                let q = try TestSupport.run(qemuImg, ["check", "-f", "parallels", p])
                #expect(q.code == 0, "\(p): \(q)")
            }
        }
    }

    @Test func initWritesTheOriginalsDescriptor() throws {
        let dir = try ScratchDirectory("ploop-compat")
        try FileManager.default.createDirectory(atPath: dir.file("disk"), withIntermediateDirectories: false)
        let r = InProcess.ploop("init", "-s", "1g", "-b", "2048", "-v", "2", dir.file("disk/root.hds"))
        #expect(r.code == 0 && r.stdout.contains("Storing \(dir.file("disk/DiskDescriptor.xml"))"), "\(r)")
        let ours = try Data(contentsOf: URL(fileURLWithPath: dir.file("disk/DiskDescriptor.xml")))
        let theirs = try Data(contentsOf: URL(fileURLWithPath: "\(Self.fixtures)/01a-init-v2/DiskDescriptor.xml"))
        #expect(ours == theirs)
        // The image header too (the recorded 64 bytes).
        let header = Array(try Data(contentsOf: URL(fileURLWithPath: dir.file("disk/root.hds"))).prefix(64))
        let xxd = try String(contentsOfFile: "\(Self.fixtures)/01a-init-v2/header.xxd", encoding: .utf8)
        let recorded = xxd.split(separator: "\n").flatMap { line in
            line.split(separator: " ").dropFirst().prefix(8).flatMap { word in
                stride(from: 0, to: word.count, by: 2).map { i in UInt8(word.dropFirst(i).prefix(2), radix: 16)! }
            }
        }
        #expect(header == recorded)
    }

    @Test func snapshotsAsTheOriginal() throws {
        let dir = try ScratchDirectory("ploop-compat")
        let disk = dir.file("disk")
        try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: false)
        #expect(InProcess.ploop("init", "-s", "1g", "-b", "2048", "-v", "2", disk + "/root.hds").code == 0)
        for (g, step) in [(Self.g1, 1), (Self.g2, 2)] {
            let r = InProcess.ploop("snapshot", "-u", g, disk + "/DiskDescriptor.xml")
            #expect(r.code == 0 && r.stdout == "ploop snapshot \(g) has been successfully created\n", "\(r)")
            let ours = try String(contentsOfFile: disk + "/DiskDescriptor.xml", encoding: .utf8)
            let theirs = try String(contentsOfFile: "\(Self.fixtures)/02-snapshot/DiskDescriptor.step\(step).xml", encoding: .utf8)
            #expect(Self.normalize(ours, known: ["root.hds"], dir: disk) == Self.normalize(theirs, known: ["root.hds"], dir: "DIR"))
        }
        let list = InProcess.ploop("snapshot-list", disk)
        let recorded = """
            PARENT_UUID                            C UUID                                   FNAME                            \n\
            {00000000-0000-0000-0000-000000000000}   {11111111-1111-4111-8111-111111111111} DIR/root.hds
            {11111111-1111-4111-8111-111111111111}   {22222222-2222-4222-8222-222222222222} DIR/NEW
            {22222222-2222-4222-8222-222222222222} * {5fbaabe3-6958-40ff-92a7-860e329aab41} DIR/NEW

            """
        #expect(Self.normalize(list.stdout, known: ["root.hds"], dir: disk) == recorded)
        // The same GUID twice, in another case, is refused and changes nothing.
        let state = try ScratchDirectoryState(disk)
        let again = InProcess.ploop("snapshot", "-u", Self.g1.uppercased(), disk)
        #expect(again.code == 38 && again.stderr.contains("already has a snapshot"), "\(again)")
        #expect(try ScratchDirectoryState(disk) == state)
    }
}
