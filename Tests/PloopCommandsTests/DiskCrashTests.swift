import Foundation
import PloopDisk
import PloopFormat
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

/// Every descriptor command killed before each of its file changes in turn (PLOOP_TEST_CRASH_AT:
/// `_exit` with nothing cleaned up). After each kill the disk reads as the old disk or the new
/// one; running the command again completes it; then the disk is the new one, checks clean, and
/// holds no leftovers (journal, temporary files, stray deltas).
struct DiskCrashTests {
    static let g1 = "{11111111-1111-4111-8111-111111111111}"
    static let g2 = "{22222222-2222-4222-8222-222222222222}"
    static let g3 = "{33333333-3333-4333-8333-333333333333}"

    /// base ← G1 … : init, then per level a few 64 KiB clusters (overlapping the level below),
    /// snapshots G1 and G2 between them. Returns the folder.
    static func stage(_ root: ScratchDirectory) throws -> String {
        let disk = root.file("disk")
        try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: false)
        #expect(InProcess.ploop("init", "-s", "64m", "-b", "128", disk + "/root.hds").code == 0)
        for (level, g) in [(0, g1), (1, g2), (2, nil)] as [(Int, String?)] {
            let d = try DiskDescriptor.parse(try Data(contentsOf: URL(fileURLWithPath: disk + "/DiskDescriptor.xml")), path: "dd")
            let top = disk + "/" + d.image(d.topGUID)!.file
            let image = try Ploop1Image(file: try ImagePath.open(top, write: true), writable: true)
            for c in [UInt64(level), UInt64(level + 1), UInt64(50 + level)] {
                let data = [UInt8](repeating: UInt8(0x30 + level), count: image.clusterBytes)
                try data.withUnsafeBytes { try image.write(cluster: ClusterIndex(c), data: $0) }
            }
            try image.close()
            if let g { #expect(InProcess.ploop("snapshot", "-u", g, disk).code == 0) }
        }
        return disk
    }

    /// What the disk reads as (cluster → byte), through the chain its descriptor names now,
    /// without recovering anything.
    static func content(_ disk: String) throws -> [UInt64: UInt8] {
        let d = try DiskDescriptor.parse(try Data(contentsOf: URL(fileURLWithPath: disk + "/DiskDescriptor.xml")), path: "dd")
        var out: [UInt64: UInt8] = [:]
        // A cluster a level above shadows may hold anything (a torn write a power cut left in
        // an image being merged into): only what the disk reads is checked.
        var mixed: [UInt64: String] = [:]
        for g in d.chain().reversed() {
            let p = disk + "/" + d.image(g)!.file
            #expect(PathInfo.kind(p) == .regular, "the descriptor names \(p), which is gone")
            let image = try Ploop1Image(file: try ImagePath.open(p, write: false), writable: false)
            var b = [UInt8](repeating: 0, count: image.clusterBytes)
            for (c, _) in image.allocatedClusters() {
                _ = try b.withUnsafeMutableBytes { try image.read(cluster: c, into: $0) }
                out[c.value] = b[0]
                mixed[c.value] = Set(b).count == 1 ? nil : p
            }
        }
        for (c, p) in mixed.sorted(by: { $0.key < $1.key }) { Issue.record("cluster \(c) of \(p) holds mixed data") }
        return out
    }

    static func copy(_ from: String, to: String) throws {
        let r = try TestSupport.run("/bin/cp", ["-a", from, to])
        precondition(r.code == 0, "\(r)")
    }

    /// The folder's names, GUIDs masked, lock files left out: what leftovers are compared by.
    static func files(_ disk: String) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: disk).filter { !$0.hasSuffix(".lck") }
            .map { $0.replacingOccurrences(of: #"\{[0-9a-f-]{36}\}"#, with: "{guid}", options: .regularExpression) }.sorted()
    }

    /// What an interrupted `command` (killed, or failed: `after` says how) must leave: the disk
    /// reads as `old` or `new`; running it again completes it; then it is `new`, checks clean and
    /// holds the reference run's files only. An image in the middle of a version conversion is
    /// "busy" until a command finishes it: no reader opens it (the original's rule).
    static func expectOldOrNewThenFinished(
        _ disk: String, old: [UInt64: UInt8], new: [UInt64: UInt8], command: [String], arguments: [String], referenceFiles: [String], after: String
    ) throws {
        if let now = try? content(disk) {
            #expect(now == old || now == new, "after \(after) the disk is neither the old nor the new one")
        } else {
            #expect(command.first == "convert", "after \(after) the disk cannot be read")
        }
        let again = InProcess.ploop(arguments)
        #expect(again.code == 0, "re-run after \(after): \(again)")
        #expect(try content(disk) == new, "after the re-run (\(after))")
        let check = InProcess.ploop("check", "-f", "-r", disk + "/DiskDescriptor.xml")
        #expect(check.code == 0, "check after \(after) and a re-run: \(check)")
        #expect(try files(disk) == referenceFiles, "leftovers after \(after) and a re-run")
    }

    static let commands: [[String]] = [
        ["snapshot", "-u", g3],
        ["snapshot-delete", "-u", g2],
        ["snapshot-delete", "-u", g1],
        ["snapshot-delete", "-u", "{5fbaabe3-6958-40ff-92a7-860e329aab41}"],
        ["snapshot-merge"],
        ["snapshot-merge", "-u", g2],
        ["snapshot-merge", "-A"],
        ["snapshot-merge", "-u", g2, "-n", "@/merged.hds"],
        ["snapshot-switch", "-u", g1],
        ["grow", "-s", "96m"],
        ["convert", "-v", "1"],
    ]

    @Test(arguments: commands)
    func killedAtEveryWrite(_ command: [String]) throws {
        let root = try ScratchDirectory("ploop-crash")
        let staged = try Self.stage(root)
        let old = try Self.content(staged)
        // The reference: the command run whole.
        let reference = root.file("reference")
        try Self.copy(staged, to: reference)
        let args = { (disk: String) in command.map { $0.replacingOccurrences(of: "@", with: disk) } + [disk + "/DiskDescriptor.xml"] }
        let whole = InProcess.ploop(args(reference))
        #expect(whole.code == 0, "\(whole)")
        let new = try Self.content(reference)
        let referenceFiles = try Self.files(reference)
        var crashes = 0
        for n in 1...400 {
            let disk = root.file("run-\(n)")
            try Self.copy(staged, to: disk)
            defer { try? FileManager.default.removeItem(atPath: disk) }
            let r = try TestSupport.run(TestSupport.ploopBinary, args(disk), environment: ["PLOOP_TEST_CRASH_AT": "\(n)"])
            if r.code == 0 { break }
            #expect(r.code == 137, "write \(n): \(r)")
            crashes += 1
            try Self.expectOldOrNewThenFinished(disk, old: old, new: new, command: command, arguments: args(disk), referenceFiles: referenceFiles, after: "a kill at write \(n)")
        }
        #expect(crashes > 3, "the command made only \(crashes) changes: the hook is not reached")
    }
}

/// `init` of a disk killed at every write: the folder holds no disk or the whole disk, never a
/// half-made image under the name asked for, and running init again completes it.
struct InitCrashTests {
    @Test(arguments: ["ploop1", "preallocated"])
    func initKilledAtEveryWrite(_ layout: String) throws {
        var crashes = 0
        for n in 1...100 {
            let root = try ScratchDirectory("ploop-initcrash")
            let disk = root.file("disk")
            try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: false)
            let args = ["init", "-f", layout, "-s", layout == "preallocated" ? "8m" : "64m", "-b", "128", disk + "/root.hds"]
            let r = try TestSupport.run(TestSupport.ploopBinary, args, environment: ["PLOOP_TEST_CRASH_AT": "\(n)"])
            if r.code == 0 { break }
            #expect(r.code == 137, "\(r)")
            crashes += 1
            let names = try FileManager.default.contentsOfDirectory(atPath: disk).filter { !$0.contains(".init-") && !$0.hasSuffix(".tmp") }.sorted()
            #expect(names == [] || names == ["root.hds"] || names == ["DiskDescriptor.xml", "root.hds"], "kill at write \(n): \(names)")
            if names.contains("root.hds") { #expect(InProcess.ploop("check", "-f", "-r", disk + "/root.hds").code == 0) }
            let again = InProcess.ploop(args)
            #expect(again.code == 0, "re-run after a kill at write \(n): \(again)")
            #expect(try FileManager.default.contentsOfDirectory(atPath: disk).sorted() == ["DiskDescriptor.xml", "root.hds"], "kill at write \(n): leftovers")
            #expect(InProcess.ploop("snapshot-list", disk).code == 0)
            #expect(try DiskLayoutTests.layout(disk) == (layout == "ploop1" ? "expanded" : layout))
        }
        #expect(crashes >= 3)
    }
}

/// `convert -v` of one image, killed at every write: `check` finishes (or finds nothing to
/// finish), and the image then holds the same data in the new or the old version.
struct ConvertCrashTests {
    @Test(arguments: [(2, 1), (1, 2)])
    func checkFinishesAnInterruptedConversion(_ from: Int, _ to: Int) throws {
        let root = try ScratchDirectory("ploop-convert")
        let image = root.file("a.hds")
        #expect(InProcess.ploop("init", "--no-descriptor", "-s", "64m", "-b", "128", "-v", "\(from)", image).code == 0)
        let writer = try Ploop1Image(file: try ImagePath.open(image, write: true), writable: true)
        for c in [UInt64(0), 7, 900] {
            let data = [UInt8](repeating: UInt8(c & 0xff) | 1, count: writer.clusterBytes)
            try data.withUnsafeBytes { try writer.write(cluster: ClusterIndex(c), data: $0) }
        }
        try writer.close()
        let original = try Data(contentsOf: URL(fileURLWithPath: image))
        let expected = try ImageContent.clusters(image)
        var crashes = 0
        for n in 1...100 {
            _ = FileManager.default.createFile(atPath: image, contents: original)
            for name in try FileManager.default.contentsOfDirectory(atPath: root.path) where name != "a.hds" { PathInfo.removeRegularFile(root.file(name)) }
            let r = try TestSupport.run(TestSupport.ploopBinary, ["convert", "-v", "\(to)", image], environment: ["PLOOP_TEST_CRASH_AT": "\(n)"])
            if r.code == 0 { break }
            #expect(r.code == 137, "\(r)")
            crashes += 1
            let check = InProcess.ploop("check", "-f", image)
            #expect(check.code == 0, "kill at write \(n): \(check)")
            let info = try ImageInfo.read(path: image)
            #expect(info.version == from || info.version == to)
            #expect(try ImageContent.clusters(image) == expected, "kill at write \(n): data changed")
            #expect(InProcess.ploop("convert", "-v", "\(to)", image).code == 0)
            #expect(try ImageInfo.read(path: image).version == to)
            #expect(try ImageContent.clusters(image) == expected)
            #expect(try FileManager.default.contentsOfDirectory(atPath: root.path) == ["a.hds"], "kill at write \(n): leftovers")
            if let qemu = TestSupport.which("qemu-img") {
                #expect(try TestSupport.run(qemu, ["check", "-f", "parallels", image]).code == 0)
            }
        }
        #expect(crashes > 3)
    }
}
