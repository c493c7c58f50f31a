import Foundation
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

/// Disks with a file system, as the original's own tests drive them: init -t ext4, mount -m,
/// resize up and down mounted, convert with snapshots, fsck — on the simulator and through the
/// kernel backend's fake driver, every file's bytes compared with what was written after each
/// step. Devices and mounts are removed by their exact names even when a test fails.
@Suite(.serialized, .enabled(if: TestSupport.simulatorUnavailable == nil, "simulator stack unavailable: \(TestSupport.simulatorUnavailable ?? "")"))
struct FileSystemDiskTests {
    /// A disk folder and a mount point; whatever is still mounted or running at the end is
    /// unmounted by name.
    final class Place {
        let root: ScratchDirectory
        let folder: String
        let dd: String
        let mnt: String
        var files: [String: [UInt8]] = [:]

        init() throws {
            root = try ScratchDirectory("ploop-fs")
            folder = root.file("disk")
            mnt = root.file("mnt")
            try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: false)
            try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: false)
            dd = folder + "/DiskDescriptor.xml"
        }

        deinit {
            if Self.mounted(mnt) { _ = try? TestSupport.sh("umount", mnt) }
            _ = try? TestSupport.ploop("umount", dd)
        }

        static func mounted(_ dir: String) -> Bool {
            let text = (try? String(contentsOfFile: "/proc/mounts", encoding: .utf8)) ?? ""
            return text.split(separator: "\n").contains { $0.split(separator: " ").dropFirst().first.map(String.init) == dir }
        }

        func write(_ name: String, megabytes: Int, seed: UInt64) throws {
            let bytes = DeviceContent.pattern(megabytes << 20, seed: seed)
            // (NSString.deletingLastPathComponent traps on a name without a slash here.)
            if let slash = name.lastIndex(of: "/") {
                try FileManager.default.createDirectory(atPath: mnt + "/" + name[..<slash], withIntermediateDirectories: true)
            }
            let f = try File(path: mnt + "/" + name, mode: .createOrOpen)
            try bytes.withUnsafeBytes { try f.write($0, at: 0) }
            try f.sync()
            files[name] = bytes
        }

        func remove(_ name: String) throws {
            try FileManager.default.removeItem(atPath: mnt + "/" + name)
            files[name] = nil
        }

        /// Every file written is there with its bytes.
        func filesMatch() -> Bool {
            files.allSatisfy { name, bytes in FileManager.default.contents(atPath: mnt + "/" + name).map { Array($0) == bytes } ?? false }
        }

        func descriptor() -> Data { FileManager.default.contents(atPath: dd) ?? Data() }
    }

    @discardableResult
    static func ploop(_ args: String..., sourceLocation: SourceLocation = #_sourceLocation) throws -> TestSupport.Result {
        let r = try TestSupport.ploop(args)
        #expect(r.code == 0, "ploop \(args.joined(separator: " ")): \(r)", sourceLocation: sourceLocation)
        return r
    }

    /// The device running the disk (from `info -d`), and its partition node.
    static func device(_ dd: String) throws -> (String, String) {
        let out = try ploop("info", "-d", dd).stdout
        func field(_ k: String) -> String {
            out.split(separator: "\n").first { $0.hasPrefix(k) }.map { String($0.dropFirst(k.count)).trimmingCharacters(in: .whitespaces) } ?? ""
        }
        return (field("device:"), field("partition:"))
    }

    static func sizeSectors(_ dd: String) throws -> UInt64 {
        let out = try ploop("info", "-s", dd).stdout
        return out.split(separator: "\n").first { $0.hasPrefix("size:") }.flatMap { UInt64($0.dropFirst(5).trimmingCharacters(in: .whitespaces)) } ?? 0
    }

    /// e2fsck -f -n on the partition with the device running and nothing mounted: clean.
    static func fsckClean(_ p: Place, sourceLocation: SourceLocation = #_sourceLocation) throws {
        try ploop("mount", p.dd)
        let (dev, part) = try device(p.dd)
        #expect(!dev.isEmpty && part == dev + "p1", "\(dev) \(part)", sourceLocation: sourceLocation)
        let r = try TestSupport.sh("e2fsck", "-f", "-n", part)
        #expect(r.code == 0, "e2fsck -f -n \(part): \(r)", sourceLocation: sourceLocation)
        try ploop("umount", p.dd)
    }

    /// The original's file-system scenario on a 1 TB sparse disk.
    @Test(arguments: TestSupport.cliBackends)
    func growMountedAndShrinkBack(backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let p = try Place()
            try Self.ploop("init", "-s", "1t", "-t", "ext4", p.folder + "/root.hds")
            let afterInit = try Self.device(p.dd).0
            #expect(afterInit.isEmpty, "init left its device running")
            try Self.ploop("mount", "-m", p.mnt, p.dd)
            #expect(FileManager.default.fileExists(atPath: p.mnt + "/.balloon-c3a5ae3d-ce7f-43c4-a1ea-c61e2b4504e8"))
            // A top-level directory each: ext4 spreads them over block groups gigabytes apart.
            for i in 0..<3 { try p.write("d\(i)/before\(i)", megabytes: 4, seed: UInt64(i + 1)) }
            let resized = try Self.ploop("resize", "--json", "-s", "2t", p.dd)
            try Golden.compareShape(resized.stdout, "json/resize.shape.txt")
            #expect(try Self.sizeSectors(p.dd) == 4 << 30)
            #expect(Place.mounted(p.mnt) && p.filesMatch())
            let grown = try FileManager.default.attributesOfFileSystem(forPath: p.mnt)[.systemSize] as? UInt64 ?? 0
            #expect(grown > 3 << 40 / 2, "the file system did not grow: \(grown) bytes")
            try Self.ploop("umount", p.dd)
            try Self.ploop("mount", "-m", p.mnt, p.dd)
            #expect(p.filesMatch())
            for i in 0..<2 { try p.write("e\(i)/after\(i)", megabytes: 4, seed: UInt64(i + 10)) }
            try Self.ploop("umount", "-m", p.mnt)
            try Self.fsckClean(p)
            try Self.ploop("mount", "-m", p.mnt, p.dd)
            try p.remove("d1/before1")
            try Self.ploop("resize", "-s", "1t", p.dd)
            #expect(try Self.sizeSectors(p.dd) == 2 << 30)
            #expect(Place.mounted(p.mnt) && p.filesMatch())
            try Self.ploop("umount", p.dd)
            try Self.fsckClean(p)
            try Self.ploop("check", "-f", p.dd)
            let q = try TestSupport.sh("qemu-img", "check", "-f", "parallels", p.folder + "/root.hds")
            #expect(q.code == 0, "\(q)")
            // The GPT is whole and its copy sits at the new end.
            try Self.ploop("mount", p.dd)
            let (dev, _) = try Self.device(p.dd)
            let v = try TestSupport.sh("sgdisk", "-v", dev)
            #expect(v.code == 0 && v.stdout.contains("No problems found"), "\(v)")
            try Self.ploop("umount", p.dd)
        } }
    }

    /// init -v 1 -t ext4, three snapshots taken while writing, convert -v 2, everything read back.
    /// dm-ploop attaches version 2 only: there the version 1 disk is made on the simulator, its
    /// mount is refused untouched, and the converted disk is mounted on dm-ploop.
    @Test(arguments: TestSupport.cliBackends)
    func versionChangeWithSnapshots(backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let p = try Place()
            try TestSupport.withBackend(backend == "dm-fake" ? "simulator" : backend) {
                try Self.ploop("init", "-s", "2g", "-v", "1", "-t", "ext4", p.folder + "/root.hds")
                try Self.ploop("mount", "-m", p.mnt, p.dd)
                for i in 0..<3 {
                    try p.write("f\(i)", megabytes: 8, seed: UInt64(100 + i))
                    try Self.ploop("snapshot", p.dd)
                }
                try p.write("last", megabytes: 2, seed: 200)
                try Self.ploop("umount", p.dd)
            }
            if backend == "dm-fake" {
                let before = try ScratchDirectoryState(p.folder)
                let refused = try TestSupport.ploop("mount", p.dd)
                #expect(refused.code != 0 && refused.stderr.contains("version 2") && refused.stderr.contains("ploop convert -v 2"), "\(refused)")
                #expect(try ScratchDirectoryState(p.folder) == before)
            }
            try Self.ploop("convert", "-v", "2", p.dd)
            #expect(try Self.ploop("info", "-s", p.dd).stdout.contains("fmt_version:\t2"))
            try Self.ploop("mount", "-m", p.mnt, p.dd)
            #expect(p.filesMatch())
            try Self.ploop("umount", p.dd)
            try Self.fsckClean(p)
            try Self.ploop("check", "-f", p.dd)
        } }
    }

    /// A shrink the file system cannot take, and the other refusals: each exits non-zero, names
    /// the problem, and leaves the descriptor, the size, the files and the mounts as they were.
    @Test(arguments: TestSupport.cliBackends)
    func refusalsChangeNothing(backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let p = try Place()
            try Self.ploop("init", "-s", "512m", "-t", "ext4", p.folder + "/root.hds")
            let bad = try TestSupport.ploop("init", "-s", "512m", "-t", "xfs", p.root.file("other.hds"))
            #expect(bad.code == 38 && bad.stderr.contains("-t xfs"), "\(bad)")
            #expect(!FileManager.default.fileExists(atPath: p.root.file("other.hds")))
            try Self.ploop("mount", "-m", p.mnt, p.dd)
            try p.write("big", megabytes: 300, seed: 7)
            let before = p.descriptor()
            let table = try TestSupport.sh("sgdisk", "-p", try Self.device(p.dd).0).stdout
            for (args, says, code) in [
                (["resize", "-s", "100m", p.dd], "at least", 38),
                (["resize", "-s", "0", p.dd], "zero", 38),
                (["resize", "-s", "512m", p.dd], "already", 38),
                (["mount", "-m", p.root.file("missing"), p.dd], "not a directory", 21),
                (["umount", "-m", p.root.path], "nothing is mounted", 40),
                (["umount", "-m", "/proc"], "not from a ploop device", 2),
            ] as [([String], String, Int32)] {
                let r = try TestSupport.ploop(args)
                #expect(r.code == code && r.stderr.contains(says), "ploop \(args.joined(separator: " ")): expected exit \(code): \(r)")
                #expect(p.descriptor() == before && Place.mounted(p.mnt) && p.filesMatch(), "after ploop \(args.joined(separator: " "))")
            }
            #expect(try TestSupport.sh("sgdisk", "-p", try Self.device(p.dd).0).stdout == table)
            try Self.ploop("umount", p.dd)
            // Mount points that cannot be used: nothing is left running.
            let busy = try TestSupport.ploop("mount", "-m", "/proc", p.dd)
            #expect(busy.code == 21 && busy.stderr.contains("busy"), "\(busy)")
            let missing = try TestSupport.ploop("mount", "-m", p.root.file("missing"), p.dd)
            #expect(missing.code == 21 && missing.stderr.contains("not a directory"), "\(missing)")
            #expect(try Self.device(p.dd).0.isEmpty)
            // A disk mounted read-only is not resized.
            try Self.ploop("mount", "-r", "-m", p.mnt, p.dd)
            let ro = try TestSupport.ploop("resize", "-s", "1g", p.dd)
            #expect(ro.code == 38 && ro.stderr.contains("read-only"), "\(ro)")
            #expect(p.descriptor() == before && p.filesMatch())
            try Self.ploop("umount", p.dd)
            #expect(!Place.mounted(p.mnt))
        } }
    }

    /// resize killed before each of its writes (device, GPT, image, descriptor), growing and then
    /// shrinking an unmounted disk: the disk still mounts with every file, and the same resize run
    /// again finishes it (a clean fsck, the size asked for).
    @Test func resizeKilledAtEveryWriteIsFinishedByARerun() throws {
        try DeviceTestLock.run {
            let p = try Place()
            try Self.ploop("init", "-s", "256m", "-t", "ext4", p.folder + "/root.hds")
            try Self.ploop("mount", "-m", p.mnt, p.dd)
            try p.write("a", megabytes: 8, seed: 1)
            try p.write("b", megabytes: 4, seed: 2)
            try Self.ploop("umount", p.dd)
            for (from, to, sectors) in [("256m", "512m", UInt64(1 << 20)), ("512m", "256m", UInt64(1 << 19))] {
                var kills = 0
                for n in 1...400 {
                    let run = try TestSupport.run(TestSupport.ploopBinary, ["resize", "-s", to, p.dd], environment: ["PLOOP_TEST_CRASH_AT": "\(n)"])
                    let label = "resize \(from) → \(to) killed at write \(n)"
                    if run.code == 0 {
                        #expect(try Self.sizeSectors(p.dd) == sectors, "\(label)")
                        break
                    }
                    #expect(run.code == 137, "\(label): \(run)")
                    kills += 1
                    let again = try TestSupport.ploop("resize", "-s", to, p.dd)
                    #expect(again.code == 0, "\(label), run again: \(again)")
                    #expect(try Self.sizeSectors(p.dd) == sectors, "\(label)")
                    _ = try? TestSupport.ploop("umount", p.dd)
                    try Self.ploop("mount", "-m", p.mnt, p.dd)
                    #expect(p.filesMatch(), "\(label): the files changed")
                    try Self.ploop("umount", p.dd)
                    let fsck = try TestSupport.ploop("fsck", "-f", p.dd)
                    #expect(fsck.code == 0, "\(label): \(fsck)")
                    // Back to where the round started.
                    try Self.ploop("resize", "-s", from, p.dd)
                }
                #expect(kills >= 5, "resize \(from) → \(to): only \(kills) writes")
            }
            try Self.ploop("check", "-f", p.dd)
            try Self.fsckClean(p)
        }
    }

    /// `resize` of an unmounted file-system disk, up and then down, under a power cut at any
    /// point: the command's changes and its device daemon's (`PLOOP_TEST_RECORD` and
    /// `PLOOP_TEST_DAEMON_RECORD` appending to one log, in the order made) give the folders a cut
    /// can leave (FolderLog). In each, `ploop resize` run again completes, the disk has the new
    /// size, every file reads its bytes and the file system checks clean. resize2fs itself is not
    /// power-cut safe (its writes between two flushes can be lost): where a cut inside it left a
    /// file system that `e2fsck -p` will not touch, the re-run says so (exit 41) and how to go
    /// on; the test then does what it says (`e2fsck -fy` on the partition) and runs it again.
    @Test func resizePowerCutStatesAreFinishedByARerun() throws {
        try DeviceTestLock.run {
            let p = try Place()
            try Self.ploop("init", "-s", "64m", "-b", "256", "-t", "ext4", p.folder + "/root.hds")
            try Self.ploop("mount", "-m", p.mnt, p.dd)
            try p.write("a", megabytes: 4, seed: 5)
            try Self.ploop("umount", p.dd)
            let folder = URL(fileURLWithPath: p.folder).standardizedFileURL.path
            for (to, sectors) in [("96m", UInt64(96 << 11)), ("64m", UInt64(64 << 11))] {
                let staged = try FolderLog.snapshot(p.folder)
                let log = p.root.file("changes.log")
                try? FileManager.default.removeItem(atPath: log)
                let r = try TestSupport.run(TestSupport.ploopBinary, ["resize", "-s", to, p.dd],
                                            environment: [ChangeRecorder.variable: log, "PLOOP_TEST_DAEMON_RECORD": log])
                try #require(r.code == 0, "resize -s \(to): \(r)")
                let done = try FolderLog.snapshot(p.folder)
                let changes = FolderLog(Array(try Data(contentsOf: URL(fileURLWithPath: log))), folder: folder)
                let states = changes.states(initial: staged, randomSubsets: CrashStates.subsets(1), cutsPerRun: 2)
                let final = FolderLog.digest(done)
                var byHand = 0
                for state in states where FolderLog.digest(state.files) != final {
                    let label = "resize -s \(to), a power cut (\(state.name))"
                    try FolderLog.materialize(state.files, at: p.folder)
                    var again = try TestSupport.ploop("resize", "-s", to, p.dd)
                    if again.code == 41 {
                        // As the message says: e2fsck by hand with the device running, then again.
                        #expect(again.stderr.contains("run 'e2fsck -f"), "\(label): \(again)")
                        byHand += 1
                        try Self.ploop("mount", p.dd)
                        let (_, part) = try Self.device(p.dd)
                        let fsck = try TestSupport.sh("e2fsck", "-f", "-y", part)
                        #expect(fsck.code <= 1, "\(label): e2fsck -fy: \(fsck)")
                        try Self.ploop("umount", p.dd)
                        again = try TestSupport.ploop("resize", "-s", to, p.dd)
                    }
                    // 38: the cut came after the work, and the re-run finds nothing to do.
                    let finished = again.code == 0 || (again.code == 38 && again.stderr.contains("nothing to do"))
                    #expect(finished, "\(label), run again: \(again)")
                    #expect(try Self.sizeSectors(p.dd) == sectors, "\(label)")
                    try Self.ploop("mount", "-m", p.mnt, p.dd)
                    #expect(p.filesMatch(), "\(label): the files changed")
                    try Self.ploop("umount", p.dd)
                    let fsck = try TestSupport.ploop("fsck", "-f", p.dd)
                    #expect(fsck.code == 0, "\(label): \(fsck)")
                }
                try FolderLog.materialize(done, at: p.folder)
                print("power-cut states: resize -s \(to) of a file-system disk: \(states.count) from \(changes.entries.count) changes, \(byHand) needed e2fsck by hand")
            }
            try Self.fsckClean(p)
        }
    }

    /// tsnapshot -m: the frozen file system mounted read-only beside the live one; the balloon
    /// commands on the descriptor.
    @Test(arguments: TestSupport.balloonBackends)
    func temporarySnapshotMountedAndBalloonByDescriptor(backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let p = try Place()
            let snap = p.root.file("snap")
            try FileManager.default.createDirectory(atPath: snap, withIntermediateDirectories: false)
            try Self.ploop("init", "-s", "1g", "-t", "ext4", p.folder + "/root.hds")
            try Self.ploop("mount", "-m", p.mnt, p.dd)
            try p.write("a", megabytes: 8, seed: 31)
            let frozen = p.files["a"]!
            let t = try Self.ploop("tsnapshot", "--json", "-u", "{22222222-2222-4222-8222-222222222222}", "-c", "backup", "-m", snap, p.dd)
            let snapDev = (try? JSONSerialization.jsonObject(with: Data(t.stdout.utf8)) as? [String: Any])?["device"] as? String ?? ""
            #expect(snapDev.hasPrefix("/dev/ploop"), "\(t)")
            try Golden.compareShape(t.stdout, "json/tsnapshot.shape.txt")
            defer { _ = try? TestSupport.ploop("umount", "-d", snapDev) }
            #expect(Place.mounted(snap), "\(t)")
            try p.write("a", megabytes: 8, seed: 32)
            #expect(FileManager.default.contents(atPath: snap + "/a").map(Array.init) == frozen, "the snapshot's file changed")
            #expect(p.filesMatch())
            try Self.ploop("umount", "-d", snapDev)
            #expect(!Place.mounted(snap))
            let shown = try Self.ploop("balloon", "show", p.dd)
            #expect(shown.stdout.contains("is 0 bytes"), "\(shown)")
            try Self.ploop("balloon", "change", "-s", "64m", p.dd)
            #expect(try Self.ploop("balloon", "show", p.dd).stdout.contains("is \(64 << 20) bytes"))
            try Golden.compareShape(try Self.ploop("balloon", "show", "--json", p.dd).stdout, "json/balloon-show.shape.txt")
            try Golden.compareShape(try Self.ploop("balloon", "status", "--json", p.dd).stdout, "json/balloon-status.shape.txt")
            #expect(p.filesMatch())
            try Self.ploop("balloon", "change", "-s", "0", p.dd)
            try Self.ploop("umount", p.dd)
            try Self.fsckClean(p)
            try Self.ploop("check", "-f", p.dd)
        } }
    }
}
