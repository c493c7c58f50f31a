import Foundation
import PloopDisk
import PloopFormat
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

/// `init -f preallocated` and `convert -f raw|preallocated|expanded`: what the disk reads never
/// changes, the files are what the layout means (a full BAT over reserved space, a sparse raw
/// file, a growing ploop1 image), the descriptor says it as the original does, and a kill at any
/// write leaves the old or the new disk, which the next command finishes (init killed at every
/// write: `InitCrashTests`).
struct DiskLayoutTests {
    static let clusterBytes = 64 * 1024

    /// A one-image disk of 8 MiB (64 KiB clusters) in `layout`, with three clusters written
    /// (0, 7, 100: fill 0x41, 0x48, 0x85), and one cluster of zeros written at 20.
    static func stage(_ root: ScratchDirectory, _ layout: String) throws -> String {
        let disk = root.file("disk")
        try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: false)
        let r = InProcess.ploop("init", "-f", layout, "-s", "8m", "-b", "128", disk + "/root.hds")
        #expect(r.code == 0, "\(r)")
        let image = disk + "/root.hds"
        if layout == "raw" {
            let f = try File(path: image, mode: .readWrite)
            for (c, byte) in Self.written {
                let data = [UInt8](repeating: byte, count: clusterBytes)
                try data.withUnsafeBytes { try f.write($0, at: c * UInt64(clusterBytes)) }
            }
            try f.sync()
        } else {
            let w = try Ploop1Image(file: try ImagePath.open(image, write: true), writable: true)
            for (c, byte) in Self.written {
                let data = [UInt8](repeating: byte, count: w.clusterBytes)
                try data.withUnsafeBytes { try w.write(cluster: ClusterIndex(c), data: $0) }
            }
            try w.close()
        }
        return disk
    }

    static let written: [(UInt64, UInt8)] = [(0, 0x41), (7, 0x48), (100, 0x85), (20, 0)]
    static let expected: [UInt64: UInt8] = [0: 0x41, 7: 0x48, 100: 0x85]
    static let diskBytes = 8 << 20

    static func descriptor(_ disk: String) throws -> DiskDescriptor {
        try DiskDescriptor.parse(try Data(contentsOf: URL(fileURLWithPath: disk + "/DiskDescriptor.xml")), path: "dd")
    }

    /// What the disk reads as, cluster → fill byte (clusters that read zeros left out), through
    /// the file its descriptor names, in the layout the descriptor says, without recovering anything.
    static func content(_ disk: String) throws -> [UInt64: UInt8] {
        let d = try descriptor(disk)
        let i = d.image(d.topGUID)!
        let p = disk + "/" + i.file
        var out: [UInt64: UInt8] = [:]
        var b = [UInt8](repeating: 0, count: clusterBytes)
        if i.kind == .plain {
            let f = try File(path: p, mode: .readOnly)
            #expect(try f.size() == UInt64(diskBytes), "the raw file is not the disk's size")
            for c in 0..<UInt64(diskBytes / clusterBytes) {
                b = [UInt8](repeating: 0, count: clusterBytes)
                _ = try b.withUnsafeMutableBytes { try f.read(into: $0, at: c * UInt64(clusterBytes)) }
                if b.contains(where: { $0 != 0 }) {
                    out[c] = b[0]
                    #expect(Set(b).count == 1, "cluster \(c) of \(p) holds mixed data")
                }
            }
            return out
        }
        let image = try Ploop1Image(file: try ImagePath.open(p, write: false), writable: false)
        for (c, _) in image.allocatedClusters() {
            _ = try b.withUnsafeMutableBytes { try image.read(cluster: c, into: $0) }
            if b.contains(where: { $0 != 0 }) {
                out[c.value] = b[0]
                #expect(Set(b).count == 1, "cluster \(c.value) of \(p) holds mixed data")
            }
        }
        return out
    }

    /// The layout the descriptor and the file say, checked against each other.
    static func layout(_ disk: String) throws -> String {
        let d = try descriptor(disk)
        let i = d.image(d.topGUID)!
        let info = try ImageInfo.read(path: disk + "/" + i.file)
        if i.kind == .plain {
            #expect(info.format == .raw && !d.preallocated)
            let xml = try String(contentsOfFile: disk + "/DiskDescriptor.xml", encoding: .utf8)
            #expect(xml.contains("<Type>Plain</Type>") && !xml.contains("Compressed"))
            return "raw"
        }
        #expect(info.format == .ploop1)
        if d.preallocated {
            #expect(info.allocatedClusters == Int(info.batEntries ?? 0), "preallocated, but \(info.allocatedClusters ?? 0) of \(info.batEntries ?? 0) clusters have a block")
            #expect(!info.flags.contains("empty"), "a preallocated image still says CIF_Empty")
            return "preallocated"
        }
        return "expanded"
    }

    @Test func initPreallocated() throws {
        let root = try ScratchDirectory("ploop-layout")
        let disk = root.file("disk")
        try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: false)
        let r = InProcess.ploop("init", "-f", "preallocated", "-s", "64m", "-b", "128", disk + "/root.hds")
        #expect(r.code == 0 && r.stdout.contains("preallocated"), "\(r)")
        #expect(try Self.layout(disk) == "preallocated")
        let xml = try String(contentsOfFile: disk + "/DiskDescriptor.xml", encoding: .utf8)
        // Where the original puts it: after Blocksize, before the images.
        #expect(xml.contains("<Blocksize>128</Blocksize>\n      <Preallocated>1</Preallocated>\n      <Image>"), "\(xml)")
        // Space reserved for every cluster (allocated blocks, not a sparse file), reading zeros.
        var st = stat()
        #expect(stat(disk + "/root.hds", &st) == 0)
        #expect(UInt64(st.st_blocks) * 512 >= 64 << 20, "only \(st.st_blocks) sectors allocated")
        #expect(try Self.content(disk) == [:])
        #expect(InProcess.ploop("check", "-f", disk + "/root.hds").code == 0)
        if let qemu = TestSupport.which("qemu-img") {
            let q = try TestSupport.run(qemu, ["check", "-f", "parallels", disk + "/root.hds"])
            #expect(q.code == 0, "\(q)")
        }
        // -f ploop1 and -f expanded are the same image.
        for f in ["ploop1", "expanded"] {
            let other = root.file(f)
            try FileManager.default.createDirectory(atPath: other, withIntermediateDirectories: false)
            #expect(InProcess.ploop("init", "-f", f, "-s", "64m", "-b", "128", other + "/root.hds").code == 0)
            #expect(try Self.layout(other) == "expanded")
            #expect(try ImageInfo.read(path: other + "/root.hds").allocatedClusters == 0)
        }
    }

    static let conversions: [(String, String)] = [
        ("expanded", "preallocated"), ("preallocated", "expanded"), ("expanded", "raw"), ("preallocated", "raw"),
        ("raw", "expanded"), ("raw", "preallocated"),
    ]

    @Test(arguments: conversions)
    func convertKeepsTheContent(_ from: String, _ to: String) throws {
        let root = try ScratchDirectory("ploop-layout")
        let disk = try Self.stage(root, from)
        #expect(try Self.layout(disk) == from)
        #expect(try Self.content(disk) == Self.expected)
        let r = InProcess.ploop("convert", "-f", to, disk)
        #expect(r.code == 0 && r.stdout == "ploop image has been successfully converted\n", "\(r)")
        #expect(try Self.layout(disk) == to)
        #expect(try Self.content(disk) == Self.expected)
        #expect(try FileManager.default.contentsOfDirectory(atPath: disk).sorted() == ["DiskDescriptor.xml", "DiskDescriptor.xml.lck", "root.hds"])
        let check = InProcess.ploop("check", "-f", disk)
        #expect(check.code == 0, "\(check)")
        let image = disk + "/root.hds"
        if to == "raw" {
            // Sparse: only the three clusters with data take space.
            var st = stat()
            #expect(stat(image, &st) == 0)
            #expect(UInt64(st.st_blocks) * 512 <= 8 * UInt64(Self.clusterBytes), "the raw file takes \(st.st_blocks) sectors")
        }
        if to == "expanded" && from == "raw" {
            // Only clusters with data get a block (the zeros written at 20 do not).
            #expect(try ImageInfo.read(path: image).allocatedClusters == 3)
        }
        // The independent reader agrees with the raw content.
        if let qemu = TestSupport.which("qemu-img") {
            let out = root.file("out.raw")
            let c = try TestSupport.run(qemu, ["convert", "-f", to == "raw" ? "raw" : "parallels", "-O", "raw", image, out])
            #expect(c.code == 0, "\(c)")
            let bytes = try Data(contentsOf: URL(fileURLWithPath: out))
            #expect(bytes.count == Self.diskBytes)
            for (cl, byte) in Self.expected { #expect(bytes[Int(cl) * Self.clusterBytes] == byte && bytes[Int(cl + 1) * Self.clusterBytes - 1] == byte) }
            #expect(bytes.filter { $0 != 0 }.count == 3 * Self.clusterBytes)
        }
        // Converting to the layout it has does nothing.
        let state = try ScratchDirectoryState(disk)
        let again = InProcess.ploop("convert", "-f", to, disk)
        #expect(again.code == 0 && again.stdout.contains("is already \(to)"), "\(again)")
        #expect(try ScratchDirectoryState(disk) == state)
    }

    /// What an interrupted `convert -f` (killed, or cut by a power cut) must leave. Without a
    /// journal, the descriptor and the file it names agree as they are; with one (stopped
    /// between the rename and the descriptor), the next command that opens the disk finishes it
    /// first. Then the disk is either layout with the same data, checks, and a re-run converts it
    /// leaving `names` only.
    static func expectOneLayoutThenConverted(_ disk: String, from: String, to: String, names: [String], after: String) throws {
        if PathInfo.kind(disk + "/DiskDescriptor.xml.journal") == .regular {
            let opened = InProcess.ploop("snapshot-list", disk)
            #expect(opened.code == 0 && opened.stderr.contains("finishing an interrupted convert -f \(to)"), "\(after): \(opened)")
        }
        let now = try layout(disk)
        #expect(now == from || now == to, "\(after): the disk is \(now)")
        #expect(try content(disk) == expected, "\(after): the data changed")
        // check finds nothing it cannot repair (a reserved tail past the last entry is trimmed).
        let check = InProcess.ploop("check", "-f", disk)
        #expect(check.code == 0, "check after \(after): \(check)")
        let again = InProcess.ploop("convert", "-f", to, disk)
        #expect(again.code == 0, "re-run after \(after): \(again)")
        #expect(try layout(disk) == to, "after the re-run (\(after))")
        #expect(try content(disk) == expected, "after the re-run (\(after))")
        #expect(try FileManager.default.contentsOfDirectory(atPath: disk).sorted() == names, "leftovers after \(after)")
    }

    @Test(arguments: conversions)
    func convertKilledAtEveryWrite(_ from: String, _ to: String) throws {
        let root = try ScratchDirectory("ploop-layoutcrash")
        let staged = try Self.stage(root, from)
        let names = ["DiskDescriptor.xml", "DiskDescriptor.xml.lck", "root.hds"]
        var crashes = 0
        for n in 1...300 {
            let disk = root.file("run-\(n)")
            let cp = try TestSupport.run("/bin/cp", ["-a", staged, disk])
            precondition(cp.code == 0, "\(cp)")
            defer { try? FileManager.default.removeItem(atPath: disk) }
            let r = try TestSupport.run(TestSupport.ploopBinary, ["convert", "-f", to, disk], environment: ["PLOOP_TEST_CRASH_AT": "\(n)"])
            if r.code == 0 { break }
            #expect(r.code == 137, "write \(n): \(r)")
            crashes += 1
            try Self.expectOneLayoutThenConverted(disk, from: from, to: to, names: names, after: "kill at write \(n)")
        }
        #expect(crashes >= 2, "the conversion made only \(crashes) changes: the hook is not reached")
    }

    /// Refusals: one line naming the cause, non-zero exit, every file as it was.
    @Test func refusals() throws {
        let root = try ScratchDirectory("ploop-layoutbad")
        let disk = try Self.stage(root, "expanded")
        #expect(InProcess.ploop("snapshot", "-u", "{11111111-1111-4111-8111-111111111111}", disk).code == 0)
        let cases: [([String], String)] = [
            (["convert", "-f", "raw", disk], "has snapshots (2 images)"),
            (["convert", "-f", "preallocated", disk], "merge them first with 'ploop snapshot-merge -A'"),
            (["convert", "-f", "qcow2", disk], "-f qcow2: the layout is raw, preallocated or expanded"),
            (["convert", "-f", "raw", "-v", "1", disk], "give -f or -v, not both"),
            (["convert", disk], "give -f raw|preallocated|expanded or -v 1|2"),
            (["convert", "-f", "raw", disk + "/root.hds"], "-f raw converts a disk: give its DiskDescriptor.xml"),
            (["init", "-f", "qcow2", "-s", "64m", root.file("x.hds")], "-f qcow2: the format is ploop1 (= expanded), expanded, preallocated or raw"),
        ]
        for (args, expect) in cases {
            let before = try ScratchDirectoryState(root.path)
            let r = InProcess.ploop(args)
            #expect(r.code != 0 && r.stderr.contains(expect), "\(args): \(r)")
            #expect(r.stderr.split(separator: "\n").count == 1, "\(args): more than one line: \(r.stderr)")
            #expect(try ScratchDirectoryState(root.path) == before, "\(args) changed files")
        }
        // → expanded is only the descriptor, and is allowed with snapshots.
        let other = try ScratchDirectory("ploop-layoutbad")
        let pre = try Self.stage(other, "preallocated")
        #expect(InProcess.ploop("snapshot", pre).code == 0)
        let r = InProcess.ploop("convert", "-f", "expanded", pre)
        #expect(r.code == 0, "\(r)")
        #expect(try !Self.descriptor(pre).preallocated)
    }
}

/// A raw disk with snapshots: the original writes Plain for every image of it (one mode per
/// disk), and reads any Plain as "the base is raw". We write and read the same.
struct RawDiskSnapshotTests {
    @Test func plainEverywhereAsTheOriginal() throws {
        let root = try ScratchDirectory("ploop-rawsnap")
        let disk = try DiskLayoutTests.stage(root, "raw")
        let r = InProcess.ploop("snapshot", "-u", "{11111111-1111-4111-8111-111111111111}", disk)
        #expect(r.code == 0, "\(r)")
        let xml = try String(contentsOfFile: disk + "/DiskDescriptor.xml", encoding: .utf8)
        #expect(xml.components(separatedBy: "<Type>Plain</Type>").count == 3 && !xml.contains("Compressed"), "\(xml)")
        // Read back: the base raw, the delta ploop1.
        let d = try DiskLayoutTests.descriptor(disk)
        #expect(d.image(d.topGUID)!.kind == .compressed && d.image(d.base!)!.kind == .plain)
        #expect(InProcess.ploop("snapshot-list", disk).code == 0)
        #expect(InProcess.ploop("check", "-f", disk).code == 0)
        // What we wrote before (Compressed above a Plain base) still reads.
        let older = xml.replacingOccurrences(of: "<Type>Plain</Type>\n        <File>root.hds.", with: "<Type>Compressed</Type>\n        <File>root.hds.")
        #expect(older != xml)
        try older.write(toFile: disk + "/DiskDescriptor.xml", atomically: true, encoding: .utf8)
        #expect(InProcess.ploop("snapshot-list", disk).code == 0)
        // Merging the snapshot down into the raw base keeps the data, and the disk is raw again.
        let m = InProcess.ploop("snapshot-merge", disk)
        #expect(m.code == 0, "\(m)")
        #expect(try DiskLayoutTests.layout(disk) == "raw")
        #expect(try DiskLayoutTests.content(disk) == DiskLayoutTests.expected)
        // Preallocated on a Plain disk is refused, as the original refuses it.
        let bad = try String(contentsOfFile: disk + "/DiskDescriptor.xml", encoding: .utf8)
            .replacingOccurrences(of: "</Blocksize>\n", with: "</Blocksize>\n      <Preallocated>1</Preallocated>\n")
        try bad.write(toFile: disk + "/DiskDescriptor.xml", atomically: true, encoding: .utf8)
        let s = InProcess.ploop("snapshot-list", disk)
        #expect(s.code != 0 && s.stderr.contains("<Preallocated> is set on a Plain (raw) disk"), "\(s)")
    }
}
