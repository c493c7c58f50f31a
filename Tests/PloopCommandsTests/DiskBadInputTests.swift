import Foundation
import PloopCommands
import PloopDisk
import PloopSystem
import PloopTestSupport
import Testing

/// Broken descriptors and wrong requests on disks: each refused with one line that names the
/// cause (the element, the GUID, the file), a non-zero exit, and every file as it was.
struct DiskBadInputTests {
    static let g1 = "{11111111-1111-4111-8111-111111111111}"
    static let g2 = "{22222222-2222-4222-8222-222222222222}"
    static let top = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"

    /// A disk base ← G1 ← G2 ← top with fixed file names (so descriptors can be edited as text).
    static func stage() throws -> (ScratchDirectory, String) {
        let root = try ScratchDirectory("ploop-ddbad")
        let disk = root.file("disk")
        try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: false)
        #expect(InProcess.ploop("init", "-s", "64m", "-b", "128", disk + "/root.hds").code == 0)
        #expect(InProcess.ploop("snapshot", "-u", g1, disk).code == 0)
        #expect(InProcess.ploop("snapshot", "-u", g2, disk).code == 0)
        // Rename the random delta names to fixed ones, in files and descriptor.
        var text = try String(contentsOfFile: disk + "/DiskDescriptor.xml", encoding: .utf8)
        let names = try FileManager.default.contentsOfDirectory(atPath: disk).filter { $0.hasPrefix("root.hds.{") }.sorted { a, b in
            text.range(of: a)!.lowerBound < text.range(of: b)!.lowerBound
        }
        for (i, n) in names.enumerated() {
            let fixed = "root.hds.\(i + 1)"
            try FileManager.default.moveItem(atPath: disk + "/" + n, toPath: disk + "/" + fixed)
            text = text.replacingOccurrences(of: n, with: fixed)
        }
        try text.write(toFile: disk + "/DiskDescriptor.xml", atomically: false, encoding: .utf8)
        return (root, disk)
    }

    struct Broken: Sendable, CustomTestStringConvertible {
        var name: String
        var edit: @Sendable (String) -> String
        var expect: String
        var testDescription: String { name }
    }

    static func replacing(_ a: String, _ b: String) -> @Sendable (String) -> String { { $0.replacingOccurrences(of: a, with: b) } }

    static let image2 = "      <Image>\n        <GUID>\(g2)</GUID>\n        <Type>Compressed</Type>\n        <File>root.hds.1</File>\n      </Image>\n"
    static let shot2 = "    <Shot>\n      <GUID>\(g2)</GUID>\n      <ParentGUID>\(g1)</ParentGUID>\n    </Shot>\n"

    static let broken: [Broken] = [
        Broken(name: "empty file", edit: { _ in "" }, expect: "the file is empty"),
        Broken(name: "cut in the middle", edit: { String($0.prefix($0.count / 2)) }, expect: "the file is cut short"),
        Broken(name: "cut inside a tag", edit: { String($0.prefix(($0.count / 2) - 3)) }, expect: "is not a valid descriptor"),
        Broken(name: "not XML", edit: { _ in "\u{1}\u{2}garbage" }, expect: "is not well-formed XML"),
        Broken(name: "another root element", edit: replacing("Parallels_disk_image>", "Other_image>"), expect: "<Other_image> is not Parallels_disk_image"),
        Broken(name: "a DTD with an entity", edit: { $0.replacingOccurrences(of: "<?xml version=\"1.0\"?>", with: "<?xml version=\"1.0\"?>\n<!DOCTYPE x [<!ENTITY e SYSTEM \"/etc/passwd\">]>") }, expect: "declares a DTD"),
        Broken(name: "no Disk_Parameters", edit: { $0.replacingOccurrences(of: "Disk_Parameters>", with: "Disk_Params>") }, expect: "<Disk_Parameters> is missing"),
        Broken(name: "Disk_size not a number", edit: replacing("<Disk_size>131072</Disk_size>", "<Disk_size>12x</Disk_size>"), expect: "<Disk_size> holds \"12x\", not a number"),
        Broken(name: "Disk_size negative", edit: replacing("<Disk_size>131072</Disk_size>", "<Disk_size>-1</Disk_size>"), expect: "<Disk_size> holds \"-1\""),
        Broken(name: "Disk_size twice", edit: replacing("<Disk_size>131072</Disk_size>", "<Disk_size>131072</Disk_size><Disk_size>131072</Disk_size>"), expect: "<Disk_size> appears 2 times"),
        Broken(name: "two Storage", edit: replacing("</Storage>", "</Storage><Storage><Blocksize>128</Blocksize></Storage>"), expect: "<Storage> appears 2 times"),
        Broken(name: "no Storage", edit: replacing("Storage>", "Storag>"), expect: "<Storage> is missing"),
        Broken(name: "no Blocksize", edit: replacing("<Blocksize>128</Blocksize>", ""), expect: "<Blocksize> is missing"),
        Broken(name: "Blocksize not a number", edit: replacing("<Blocksize>128</Blocksize>", "<Blocksize>abc</Blocksize>"), expect: "<Blocksize> holds \"abc\""),
        Broken(name: "Blocksize differs from the images", edit: replacing("<Blocksize>128</Blocksize>", "<Blocksize>2048</Blocksize>"), expect: "<Blocksize> is 2048 sectors"),
        Broken(name: "End differs from Disk_size", edit: replacing("<End>131072</End>", "<End>5</End>"), expect: "<End> is 5"),
        Broken(name: "Start is not 0", edit: replacing("<Start>0</Start>", "<Start>8</Start>"), expect: "<Start> is 8"),
        Broken(name: "Disk_size differs from the top image", edit: { $0.replacingOccurrences(of: "131072", with: "262144") }, expect: "<Disk_size> is 262144 sectors but the top image"),
        Broken(name: "an Image without a Shot", edit: replacing("</Storage>", "  <Image>\n        <GUID>{99999999-9999-4999-8999-999999999999}</GUID>\n        <Type>Compressed</Type>\n        <File>root.hds</File>\n      </Image>\n    </Storage>"), expect: "<Image> {99999999-9999-4999-8999-999999999999} has no <Shot>"),
        Broken(name: "a Shot without an Image", edit: replacing("</Snapshots>", "<Shot><GUID>{99999999-9999-4999-8999-999999999999}</GUID><ParentGUID>\(g1)</ParentGUID></Shot></Snapshots>"), expect: "<Shot> {99999999-9999-4999-8999-999999999999} names no <Image>"),
        Broken(name: "a ParentGUID that names nothing", edit: replacing("<ParentGUID>\(g1)</ParentGUID>", "<ParentGUID>{99999999-9999-4999-8999-999999999999}</ParentGUID>"), expect: "<ParentGUID> {99999999-9999-4999-8999-999999999999} of snapshot \(g2) names no snapshot"),
        Broken(name: "two images with one GUID", edit: { $0.replacingOccurrences(of: "</Storage>", with: image2.replacingOccurrences(of: "root.hds.1", with: "root.hds") + "    </Storage>") }, expect: "<Image> \(g2) appears twice"),
        Broken(name: "two Shots with one GUID", edit: replacing("</Snapshots>", shot2 + "  </Snapshots>"), expect: "<Shot> \(g2) appears twice"),
        Broken(name: "a GUID in another case twice", edit: { $0.replacingOccurrences(of: "</Storage>", with: image2.replacingOccurrences(of: g2, with: g2.uppercased()) + "    </Storage>") }, expect: "appears twice"),
        Broken(name: "a cycle", edit: replacing("<ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>", "<ParentGUID>\(g2)</ParentGUID>"), expect: "there is no base image"),
        Broken(name: "two bases", edit: replacing("<ParentGUID>\(g1)</ParentGUID>", "<ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>"), expect: "a disk has one base"),
        Broken(name: "no TopGUID", edit: { $0.replacingOccurrences(of: "<TopGUID>\(top)</TopGUID>", with: "") }, expect: "<TopGUID> is missing"),
        Broken(name: "a TopGUID that names nothing", edit: replacing("<TopGUID>\(top)</TopGUID>", "<TopGUID>{99999999-9999-4999-8999-999999999999}</TopGUID>"), expect: "<TopGUID> {99999999-9999-4999-8999-999999999999} names no image"),
        Broken(name: "a TopGUID that is not a leaf", edit: replacing("<TopGUID>\(top)</TopGUID>", "<TopGUID>\(g1)</TopGUID>"), expect: "has snapshots above it"),
        Broken(name: "a GUID that is not a GUID", edit: replacing("<GUID>\(g1)</GUID>", "<GUID>{xyz}</GUID>"), expect: "holds \"{xyz}\", not a GUID"),
        Broken(name: "the zero GUID as a snapshot", edit: { $0.replacingOccurrences(of: g1, with: "{00000000-0000-0000-0000-000000000000}") }, expect: "zero GUID"),
        Broken(name: "an unknown Type", edit: replacing("<Type>Compressed</Type>", "<Type>Qcow2</Type>"), expect: "<Type> holds \"Qcow2\""),
        Broken(name: "Plain above the base", edit: { s in
            var t = s
            if let r = t.range(of: "<Type>Compressed</Type>\n        <File>root.hds.2</File>") { t.replaceSubrange(r, with: "<Type>Plain</Type>\n        <File>root.hds.2</File>") }
            return t
        }, expect: "is Plain (a raw disk) but the base root.hds is a ploop1 image"),
        Broken(name: "an empty File", edit: replacing("<File>root.hds.1</File>", "<File></File>"), expect: "<File> of image \(g2) is empty"),
        Broken(name: "a File climbing through sub/..", edit: replacing("<File>root.hds.1</File>", "<File>sub/../root.hds.1</File>"), expect: "climbs through '..'"),
        Broken(name: "a File through ./", edit: replacing("<File>root.hds.1</File>", "<File>./root.hds.1</File>"), expect: "climbs through '..' or '.'"),
        Broken(name: "a File that does not exist", edit: replacing("<File>root.hds.1</File>", "<File>gone.hds</File>"), expect: "gone.hds of image \(g2) does not exist"),
        Broken(name: "a File that is a folder", edit: replacing("<File>root.hds.1</File>", "<File>sub</File>"), expect: "sub of image \(g2) is not a regular file"),
        Broken(name: "a File that is not an image", edit: replacing("<File>root.hds.1</File>", "<File>garbage</File>"), expect: "garbage is not a ploop1 image"),
    ]

    static let commands: [[String]] = [
        ["snapshot-list"], ["snapshot", "-u", "{33333333-3333-4333-8333-333333333333}"], ["snapshot-delete", "-u", g2],
        ["snapshot-merge"], ["snapshot-switch", "-u", g1], ["check", "-f"], ["info", "-s"], ["grow", "-s", "128m"], ["mount", "-r"],
    ]

    /// Refused with one line saying `expect`, exit `code`, and the disk's files as they were.
    static func expectRefused(_ args: [String], _ expect: String, code: Int32, root: ScratchDirectory, disk: String, env: [String: String] = [:], _ label: String) throws {
        let before = try ScratchDirectoryState(disk)
        let r = try TestSupport.run("/bin/sh", ["-c", "ulimit -v \(TestSupport.addressSpaceLimitKiB); exec \"$0\" \"$@\"", TestSupport.ploopBinary] + args, cwd: root.path, environment: env)
        #expect(r.signal == nil && r.code == code, "\(label): expected exit \(code): \(r)")
        let lines = r.stderr.split(separator: "\n")
        #expect(lines.count == 1 && lines[0].hasPrefix("ploop: "), "\(label): not one line: \(r)")
        #expect(r.stderr.contains(expect), "\(label): expected «\(expect)»: \(r)")
        #expect(try ScratchDirectoryState(disk) == before, "\(label): files changed")
    }

    @Test(arguments: broken)
    func brokenDescriptorIsRefused(_ b: Broken) throws {
        let (root, disk) = try Self.stage()
        try FileManager.default.createDirectory(atPath: disk + "/sub", withIntermediateDirectories: false)
        _ = FileManager.default.createFile(atPath: disk + "/garbage", contents: Data(repeating: 0xAB, count: 100_000))
        let dd = disk + "/DiskDescriptor.xml"
        let text = try String(contentsOfFile: dd, encoding: .utf8)
        let edited = b.edit(text)
        #expect(edited != text, "\(b.name): the edit changed nothing")
        try edited.write(toFile: dd, atomically: false, encoding: .utf8)
        for cmd in Self.commands {
            try Self.expectRefused(cmd + [dd], b.expect, code: ExitCodes.descriptor, root: root, disk: disk, "\(b.name): \(cmd.joined(separator: " "))")
        }
    }

    struct Wrong: Sendable, CustomTestStringConvertible {
        var args: [String]
        var expect: String
        var code: Int32
        var testDescription: String { args.joined(separator: " ") }
    }

    static let wrong: [Wrong] = [
        Wrong(args: ["snapshot-delete", "-u", "{99999999-9999-4999-8999-999999999999}", "@"], expect: "has no snapshot {99999999-9999-4999-8999-999999999999}", code: 43),
        Wrong(args: ["snapshot-delete", "-u", "garbage", "@"], expect: "garbage is not a GUID", code: 38),
        Wrong(args: ["snapshot-delete", "@"], expect: "Missing expected argument '--uuid <GUID>'", code: 38),
        Wrong(args: ["snapshot-merge", "-u", g1, "@"], expect: "is the base image", code: 38),
        Wrong(args: ["snapshot-merge", "-A", "-u", g2, "@"], expect: "Options -u and -A can't be used together", code: 38),
        Wrong(args: ["snapshot-merge", "-u", g2, "-n", "@root.hds", "@"], expect: "already exists", code: 4),
        Wrong(args: ["snapshot-switch", "-u", top, "@"], expect: "already on \(top)", code: 38),
        Wrong(args: ["snapshot-switch", "-u", top.uppercased(), "@"], expect: "already on", code: 38),
        Wrong(args: ["snapshot-switch", "-u", "{99999999-9999-4999-8999-999999999999}", "@"], expect: "has no snapshot", code: 43),
        Wrong(args: ["snapshot", "-u", g1, "@"], expect: "already has a snapshot \(g1)", code: 38),
        Wrong(args: ["snapshot", "-u", g1.uppercased(), "@"], expect: "already has a snapshot", code: 38),
        Wrong(args: ["snapshot", "-u", "{00000000-0000-0000-0000-000000000000}", "@"], expect: "reserved", code: 38),
        Wrong(args: ["snapshot-list", "-o", "uuid,size", "@"], expect: "Unknown field: size", code: 38),
        Wrong(args: ["snapshot-list", "-u", "{99999999-9999-4999-8999-999999999999}", "@"], expect: "has no snapshot", code: 43),
        Wrong(args: ["snapshot-delete", "-u", g2, "@root.hds"], expect: "no DiskDescriptor.xml there", code: 39),
        Wrong(args: ["snapshot-list", "@nowhere"], expect: "no DiskDescriptor.xml there", code: 39),
        Wrong(args: ["restore-descriptor", "@.", "@root.hds"], expect: "already exists", code: 38),
        Wrong(args: ["init", "-s", "1g", "@new.hds"], expect: "DiskDescriptor.xml already exists", code: 38),
        Wrong(args: ["grow", "-s", "1m", "@"], expect: "cannot shrink", code: 38),
        Wrong(args: ["check", "-u", "{99999999-9999-4999-8999-999999999999}", "@"], expect: "has no snapshot", code: 43),
        Wrong(args: ["mount", "-u", "{99999999-9999-4999-8999-999999999999}", "@"], expect: "has no snapshot", code: 43),
        Wrong(args: ["tsnapshot", "-u", g1, "-c", "backup", "@"], expect: "already has a snapshot \(g1)", code: 38),
        Wrong(args: ["tsnapshot", "-u", "garbage", "-c", "backup", "@"], expect: "garbage is not a GUID", code: 38),
        Wrong(args: ["tsnapshot", "-u", "{99999999-9999-4999-8999-999999999999}", "@"], expect: "Missing expected argument '--component <COMPONENT>'", code: 38),
        Wrong(args: ["tsnapshot", "-u", "{99999999-9999-4999-8999-999999999999}", "-c", "a/b", "@"], expect: "a component is a name of 1 to 63 bytes", code: 38),
        Wrong(args: ["tsnapshot", "-u", "{99999999-9999-4999-8999-999999999999}", "-c", "backup", "-m", "/mnt", "@"], expect: "has no file system to mount", code: 38),
        Wrong(args: ["convert", "-f", "raw", "@"], expect: "has snapshots (3 images)", code: 38),
    ]

    @Test(arguments: wrong)
    func wrongRequestIsRefused(_ w: Wrong) throws {
        let (root, disk) = try Self.stage()
        let args = w.args.map { a in a == "@" ? disk + "/DiskDescriptor.xml" : a.hasPrefix("@") ? disk + "/" + a.dropFirst() : a }
        try Self.expectRefused(args, w.expect, code: w.code, root: root, disk: disk, w.testDescription)
    }

    @Test func singleImageBaseCannotBeDeletedOrMerged() throws {
        let root = try ScratchDirectory("ploop-ddbad")
        let disk = root.file("disk")
        try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: false)
        #expect(InProcess.ploop("init", "-s", "64m", disk + "/root.hds").code == 0)
        try Self.expectRefused(["snapshot-delete", "-u", Self.top, disk], "unable to delete the base image", code: ExitCodes.param, root: root, disk: disk, "delete")
        try Self.expectRefused(["snapshot-merge", disk], "is the base image", code: ExitCodes.param, root: root, disk: disk, "merge")
        try Self.expectRefused(["snapshot-merge", "-A", disk], "has one image", code: ExitCodes.param, root: root, disk: disk, "merge -A")
    }

    @Test func switchingToATemporarySnapshotIsRefused() throws {
        let (root, disk) = try Self.stage()
        let dd = disk + "/DiskDescriptor.xml"
        let text = try String(contentsOfFile: dd, encoding: .utf8)
        let marked = text.replacingOccurrences(of: "<GUID>\(Self.g2)</GUID>\n      <ParentGUID>\(Self.g1)</ParentGUID>\n", with: "<GUID>\(Self.g2)</GUID>\n      <ParentGUID>\(Self.g1)</ParentGUID>\n      <Temporary/>\n")
        #expect(marked != text)
        try marked.write(toFile: dd, atomically: false, encoding: .utf8)
        try Self.expectRefused(["snapshot-switch", "-u", Self.g2, dd], "is temporary", code: ExitCodes.param, root: root, disk: disk, "switch to a temporary snapshot")
    }

    @Test func aLockHeldByAnotherProcessIsNamed() throws {
        let (root, disk) = try Self.stage()
        // Another process holds the lock for a while.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/flock")
        holder.arguments = [disk + "/DiskDescriptor.xml.lck", "sleep", "5"]
        try holder.run()
        defer { if holder.isRunning { kill(holder.processIdentifier, SIGTERM) }; holder.waitUntilExit() }
        // flock(1) forks sleep holding the lock: wait until it is taken.
        var held = false
        for _ in 0..<100 where !held {
            let f = try File(path: disk + "/DiskDescriptor.xml.lck", mode: .readOnly)
            held = !(try f.tryLock(.exclusive))
            if !held { f.unlock(); usleep(20_000) }
        }
        #expect(held)
        for cmd in [["snapshot", "-u", "{33333333-3333-4333-8333-333333333333}"], ["snapshot-delete", "-u", Self.g2], ["snapshot-list"]] {
            try Self.expectRefused(cmd + [disk], "is locked by process", code: ExitCodes.lock, root: root, disk: disk, env: ["PLOOP_LOCK_TIMEOUT": "0.3"], cmd.joined(separator: " "))
        }
    }
}

/// `replace`: by GUID, level or file, with and without -k; what is not equivalent is refused.
struct DiskReplaceTests {
    @Test func replacesByGUIDLevelAndFile() throws {
        let (root, disk) = try DiskBadInputTests.stage()
        let dd = disk + "/DiskDescriptor.xml"
        let before = try DiskCrashTests.content(disk)
        // -u: the descriptor names the copy (outside the folder), the old file stays.
        _ = try TestSupport.run("/bin/cp", [disk + "/root.hds", root.file("copy-base.hds")])
        let r1 = InProcess.ploop("replace", "-u", DiskBadInputTests.g1, "-i", root.file("copy-base.hds"), dd)
        #expect(r1.code == 0, "\(r1)")
        #expect(try String(contentsOfFile: dd, encoding: .utf8).contains("<File>../copy-base.hds</File>"))
        #expect(FileManager.default.fileExists(atPath: disk + "/root.hds"))
        // -l 1 -k: the copy is renamed over the old file; the descriptor does not change.
        let text = try String(contentsOfFile: dd, encoding: .utf8)
        _ = try TestSupport.run("/bin/cp", [disk + "/root.hds.1", root.file("copy-1.hds")])
        let inode = PathInfo.identity(disk + "/root.hds.1")
        let r2 = InProcess.ploop("replace", "-l", "1", "-k", "-i", root.file("copy-1.hds"), dd)
        #expect(r2.code == 0, "\(r2)")
        #expect(try String(contentsOfFile: dd, encoding: .utf8) == text)
        #expect(PathInfo.identity(disk + "/root.hds.1") != inode)
        #expect(!FileManager.default.fileExists(atPath: root.file("copy-1.hds")))
        // -o: by the current file.
        _ = try TestSupport.run("/bin/cp", [disk + "/root.hds.2", disk + "/top-copy.hds"])
        let r3 = InProcess.ploop("replace", "-o", disk + "/root.hds.2", "-i", disk + "/top-copy.hds", dd)
        #expect(r3.code == 0, "\(r3)")
        #expect(try String(contentsOfFile: dd, encoding: .utf8).contains("<File>top-copy.hds</File>"))
        #expect(try DiskCrashTests.content(disk) == before)
        #expect(InProcess.ploop("check", "-f", "-r", dd).code == 0)
    }

    @Test func refusesWhatIsNotEquivalent() throws {
        let (root, disk) = try DiskBadInputTests.stage()
        let dd = disk + "/DiskDescriptor.xml"
        #expect(InProcess.ploop("init", "--no-descriptor", "-s", "128m", "-b", "128", root.file("bigger.hds")).code == 0)
        #expect(InProcess.ploop("init", "--no-descriptor", "-s", "64m", "-b", "256", root.file("other-cluster.hds")).code == 0)
        _ = try TestSupport.run("/bin/cp", [disk + "/root.hds.1", root.file("corrupt.hds")])
        let f = try File(path: root.file("corrupt.hds"), mode: .readWrite)
        try [UInt8](arrayLiteral: 0xFF, 0xFF, 0xFF, 0x7F).withUnsafeBytes { try f.write($0, at: 64 + 4 * 9) }
        let cases: [([String], String, Int32)] = [
            (["replace", "-u", DiskBadInputTests.g1, "-i", root.file("bigger.hds"), dd], "must be the same size", 38),
            (["replace", "-u", DiskBadInputTests.g1, "-i", root.file("other-cluster.hds"), dd], "has clusters of 256 sectors, the disk 128", 38),
            (["replace", "-l", "1", "-i", root.file("corrupt.hds"), dd], "is corrupt", 11),
            (["replace", "-l", "7", "-i", root.file("corrupt.hds"), dd], "-l 7: the disk has levels 0..2", 38),
            (["replace", "-o", root.file("bigger.hds"), "-i", root.file("corrupt.hds"), dd], "is not an image of", 38),
            (["replace", "-l", "0", "-i", disk + "/root.hds.1", dd], "already an image of", 38),
            (["replace", "-l", "0", "-i", root.file("missing.hds"), dd], "no such file", 4),
            (["replace", "-l", "0", "-u", DiskBadInputTests.g1, "-i", root.file("bigger.hds"), dd], "exactly one of", 38),
            (["replace", "-l", "0", dd], "Missing expected argument", 38),
        ]
        for (args, expect, code) in cases {
            try DiskBadInputTests.expectRefused(args, expect, code: code, root: root, disk: disk, args.joined(separator: " "))
        }
    }
}
