import Foundation
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

/// A disk (DiskDescriptor.xml) used as vzctl would, on every backend: mount it, write through the
/// device, snapshot it online, grow it online, refuse offline-only commands while it runs, unmount
/// it, mount a snapshot read-only, merge everything offline — with the device's bytes checked
/// against what was written after each step. Devices are stopped by their exact name even when a
/// test fails.
@Suite(.serialized, .enabled(if: TestSupport.simulatorUnavailable == nil, "simulator stack unavailable: \(TestSupport.simulatorUnavailable ?? "")"))
struct DiskIntegrationTests {
    static let g1 = "{11111111-1111-4111-8111-111111111111}"

    final class Devices {
        var names: [String] = []
        deinit { for d in names.reversed() { _ = try? TestSupport.ploop("umount", "-d", d) } }
    }

    /// A fresh one-image disk (64 KiB clusters) mounted by its descriptor, with the bytes the
    /// device must hold kept beside it.
    final class RunningDisk {
        let root: ScratchDirectory
        let disk: String
        let dd: String
        let devices = Devices()
        let dev: String
        let size: Int
        var expected: [UInt8]

        init(megabytes: Int) throws {
            root = try ScratchDirectory("ploop-disk")
            disk = root.file("disk")
            try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: false)
            dd = disk + "/DiskDescriptor.xml"
            size = megabytes << 20
            expected = [UInt8](repeating: 0, count: size)
            _ = try DiskIntegrationTests.ploop("init", "-s", "\(megabytes)m", "-b", "128", disk + "/root.hds")
            dev = try DiskIntegrationTests.ploop("mount", dd).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            devices.names.append(dev)
        }

        /// Writes a pattern through the device and into `expected`.
        func write(seed: UInt64, at offset: Int, _ count: Int) throws {
            let p = DeviceContent.pattern(count, seed: seed)
            try DiskIntegrationTests.write(dev, p, at: UInt64(offset))
            expected.replaceSubrange(offset..<(offset + count), with: p)
        }

        func matches(_ device: String? = nil) throws -> Bool { try DiskIntegrationTests.read(device ?? dev, count: size) == expected }

        /// Unmounts, checks, mounts again and compares every byte, then unmounts.
        func remountMatches() throws -> Bool {
            _ = try DiskIntegrationTests.ploop("umount", dd)
            devices.names.removeAll { $0 == dev }
            _ = try DiskIntegrationTests.ploop("check", "-f", dd)
            let again = try DiskIntegrationTests.ploop("mount", dd).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            devices.names.append(again)
            let same = try matches(again)
            _ = try DiskIntegrationTests.ploop("umount", dd)
            devices.names.removeAll { $0 == again }
            return same
        }
    }

    static func ploop(_ args: String..., sourceLocation: SourceLocation = #_sourceLocation) throws -> TestSupport.Result {
        let r = try TestSupport.ploop(args)
        #expect(r.code == 0, "ploop \(args.joined(separator: " ")): \(r)", sourceLocation: sourceLocation)
        return r
    }

    static func write(_ device: String, _ bytes: [UInt8], at offset: UInt64) throws {
        let f = try File(path: device, mode: .readWrite)
        try bytes.withUnsafeBytes { try f.write($0, at: offset) }
        try f.sync()
    }

    static func read(_ device: String, count: Int) throws -> [UInt8] {
        let f = try File(path: device, mode: .readOnly)
        var b = [UInt8](repeating: 0, count: count)
        let n = try b.withUnsafeMutableBytes { try f.read(into: $0, at: 0) }
        #expect(n == count)
        return b
    }

    static func size(_ device: String) throws -> UInt64 {
        let r = try TestSupport.sh("blockdev", "--getsize64", device)
        return UInt64(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
    }

    @Test(arguments: TestSupport.cliBackends)
    func theDiskAsUsersManageIt(_ backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let root = try ScratchDirectory("ploop-disk")
            let disk = root.file("disk")
            try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: false)
            let dd = disk + "/DiskDescriptor.xml"
            let devices = Devices()
            _ = try Self.ploop("init", "-s", "64m", "-b", "128", disk + "/root.hds")

            // Mount the disk and write A.
            let dev = try Self.ploop("mount", dd).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            devices.names.append(dev)
            var expected = [UInt8](repeating: 0, count: 64 << 20)
            let a = DeviceContent.pattern(4 << 20, seed: 1)
            try Self.write(dev, a, at: 0)
            expected.replaceSubrange(0..<a.count, with: a)
            let atG1 = expected

            // Online snapshot: the old top becomes G1; B lands in the new top.
            let snap = try Self.ploop("snapshot", "-u", Self.g1, dd)
            #expect(snap.stdout.contains("ploop snapshot \(Self.g1) has been successfully created"))
            let b = DeviceContent.pattern(4 << 20, seed: 2)
            try Self.write(dev, b, at: 2 << 20)
            expected.replaceSubrange((2 << 20)..<(6 << 20), with: b)
            let list = try Self.ploop("snapshot-list", "-H", "-o", "uuid,current", dd)
            #expect(list.stdout == "\(Self.g1)  \n{5fbaabe3-6958-40ff-92a7-860e329aab41} *\n", "\(list)")
            #expect(try TestSupport.ploop("list").stdout.contains(dev))

            // While it runs: a second mount, offline-only commands and deleting the running top are
            // refused, nothing touched.
            let state = try ScratchDirectoryState(disk)
            // 37: the disk is running; 38: not while its top is running (a parameter refused).
            for (args, code) in [
                (["mount", dd], 37), (["snapshot-switch", "-u", Self.g1, dd], 37), (["snapshot-delete", "-u", "{5fbaabe3-6958-40ff-92a7-860e329aab41}", dd], 38),
                (["snapshot-merge", "-n", root.file("new.hds"), dd], 38), (["convert", "-f", "raw", dd], 37), (["convert", "-v", "1", dd], 37),
            ] as [([String], Int32)] {
                let r = try TestSupport.ploop(args)
                #expect(r.code == code && r.stderr.contains(dev), "\(args): expected exit \(code): \(r)")
            }
            #expect(try ScratchDirectoryState(disk) == state)

            // Online grow through the disk: the device and the descriptor follow.
            _ = try Self.ploop("grow", "-s", "128m", dd)
            #expect(try Self.size(dev) == 128 << 20)
            #expect(try Self.ploop("info", "-s", dd).stdout.hasPrefix("size:\t\t262144\nblocksize:\t128\n"))
            let c = DeviceContent.pattern(1 << 20, seed: 3)
            try Self.write(dev, c, at: 100 << 20)
            expected += [UInt8](repeating: 0, count: 64 << 20)
            expected.replaceSubrange((100 << 20)..<(101 << 20), with: c)
            #expect(try Self.read(dev, count: 128 << 20) == expected)
            #expect(try Self.ploop("info", "-d", dd).stdout.hasPrefix("device:\t\t\(dev)\n"))

            // A copy of the running disk (its top delta, as the original copies it).
            let copied = root.file("copy.hds")
            _ = try Self.ploop("copy", "-s", dd, "-d", copied)

            // Unmount by the descriptor; the disk checks clean; the copy is its top delta.
            _ = try Self.ploop("umount", dd)
            devices.names.removeAll { $0 == dev }
            _ = try Self.ploop("check", "-f", dd)
            _ = try Self.ploop("check", "-f", "-r", copied)
            let topFile = try FileManager.default.contentsOfDirectory(atPath: disk).first { $0.hasPrefix("root.hds.{") }!
            #expect(try ImageContent.clusters(copied) == ImageContent.clusters(disk + "/" + topFile))

            // The snapshot, read-only: the disk as it was at G1.
            let ro = try Self.ploop("mount", "-u", Self.g1, dd).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            devices.names.append(ro)
            #expect(try Self.read(ro, count: 64 << 20) == atG1)
            _ = try Self.ploop("umount", "-d", ro)
            devices.names.removeAll { $0 == ro }

            // Convert the three images to v1 and back, mounting after each to read every byte.
            for v in ["1", "2"] {
                _ = try Self.ploop("convert", "-v", v, dd)
                #expect(try Self.ploop("info", "-s", dd).stdout.contains("fmt_version:\t\(v)\n"))
                if v == "1" && backend == "dm-fake" {
                    // dm-ploop attaches version 2 images only: refused, saying how to fix it.
                    let refused = try TestSupport.ploop("mount", dd)
                    #expect(refused.code != 0 && refused.stderr.contains("ploop convert -v 2"), "\(refused)")
                    continue
                }
                let m = try Self.ploop("mount", dd).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                devices.names.append(m)
                #expect(try Self.read(m, count: 128 << 20) == expected, "after convert -v \(v)")
                _ = try Self.ploop("umount", dd)
                devices.names.removeAll { $0 == m }
            }

            // A second snapshot, then delete the first: the disk reads the same.
            _ = try Self.ploop("snapshot", "-u", "{22222222-2222-4222-8222-222222222222}", dd)
            _ = try Self.ploop("snapshot-delete", "-u", Self.g1, dd)
            let afterDelete = try Self.ploop("mount", dd).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            devices.names.append(afterDelete)
            #expect(try Self.read(afterDelete, count: 128 << 20) == expected, "after snapshot-delete")
            let d = DeviceContent.pattern(1 << 20, seed: 4)
            try Self.write(afterDelete, d, at: 10 << 20)
            _ = try Self.ploop("umount", dd)
            devices.names.removeAll { $0 == afterDelete }

            // Switch back to the snapshot: what was written since (D) is gone.
            _ = try Self.ploop("snapshot-switch", "-u", "{22222222-2222-4222-8222-222222222222}", dd)
            let switched = try Self.ploop("mount", dd).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            devices.names.append(switched)
            #expect(try Self.read(switched, count: 128 << 20) == expected, "after snapshot-switch")
            _ = try Self.ploop("umount", dd)
            devices.names.removeAll { $0 == switched }

            // Everything merged offline into the base: the same bytes, one image.
            _ = try Self.ploop("snapshot-merge", "-A", dd)
            let merged = try Self.ploop("mount", dd).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            devices.names.append(merged)
            #expect(try Self.read(merged, count: 128 << 20) == expected)
            _ = try Self.ploop("umount", dd)
            devices.names.removeAll { $0 == merged }
            #expect(try FileManager.default.contentsOfDirectory(atPath: disk).filter { !$0.hasSuffix(".lck") }.sorted() == ["DiskDescriptor.xml", "root.hds"])
            _ = try Self.ploop("check", "-f", dd)
        } }
    }

    /// snapshot-delete and snapshot-merge while the disk runs: the merges run on the device, the
    /// file system (here: raw bytes) stays in use, the descriptor follows, and the bytes are the
    /// same before, after, and after a remount.
    @Test(arguments: TestSupport.cliBackends)
    func onlineDeleteAndMerge(_ backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let r = try RunningDisk(megabytes: 32)
            let (dd, dev) = (r.dd, r.dev)
            try r.write(seed: 1, at: 0, 8 << 20)
            _ = try Self.ploop("snapshot", "-u", Self.g1, dd)
            try r.write(seed: 2, at: 4 << 20, 8 << 20)
            _ = try Self.ploop("snapshot", "-u", "{22222222-2222-4222-8222-222222222222}", dd)
            try r.write(seed: 3, at: 10 << 20, 4 << 20)
            #expect(try r.matches())

            // Delete G1 (the base's snapshot): G2's delta merges into root.hds on the device.
            let del = try Self.ploop("snapshot-delete", "-u", Self.g1, dd)
            #expect(del.stdout == "ploop snapshot merged\n", "\(del)")
            #expect(try r.matches(), "after the online snapshot-delete")
            let afterDelete = try Self.ploop("snapshot-list", "-H", "-o", "uuid", dd).stdout
            #expect(afterDelete == "{22222222-2222-4222-8222-222222222222}\n{5fbaabe3-6958-40ff-92a7-860e329aab41}\n", "\(afterDelete)")
            #expect(try Self.ploop("info", "-d", dd).stdout.hasPrefix("device:\t\t\(dev)\n"))
            try r.write(seed: 4, at: 20 << 20, 2 << 20)

            // Merge the top into its parent: one image left, still running.
            let merge = try Self.ploop("snapshot-merge", dd)
            #expect(merge.stdout == "ploop snapshot merged\n", "\(merge)")
            #expect(try r.matches(), "after the online snapshot-merge")
            #expect(try Self.ploop("snapshot-list", "-H", "-o", "uuid", dd).stdout == "{5fbaabe3-6958-40ff-92a7-860e329aab41}\n")
            #expect(try FileManager.default.contentsOfDirectory(atPath: r.disk).filter { !$0.hasSuffix(".lck") }.sorted() == ["DiskDescriptor.xml", "root.hds"])
            try r.write(seed: 5, at: 30 << 20, 1 << 20)

            // Merging the base while running is refused as offline.
            let base = try TestSupport.ploop("snapshot-merge", dd)
            #expect(base.code == 38 && base.stderr.contains("base image"), "\(base)")
            #expect(try r.remountMatches(), "after a remount")
        } }
    }

    /// dm-ploop's reverse merge killed at each of snapshot-merge's writes; where a kill left the
    /// device past its flip (the reverse-merge marker beside the file below), the device is
    /// stopped by its name, with no command on the disk in between: the next mount finishes the
    /// merge offline keeping the file below's clusters, and every byte reads as before.
    @Test func aReverseMergeStoppedPastItsFlipIsFinishedOffline() throws {
        try DeviceTestLock.run { try TestSupport.withBackend("dm-fake") {
            let r = try RunningDisk(megabytes: 16)
            let (dd, dev) = (r.dd, r.dev)
            func markers() throws -> [String] { try FileManager.default.contentsOfDirectory(atPath: r.disk).filter { $0.hasSuffix(".reverse-merge") } }
            var stopped = false
            for n in 1...40 {
                if try Self.ploop("snapshot-list", "-H", "-o", "uuid", dd).stdout.split(separator: "\n").count == 1 { _ = try Self.ploop("snapshot", dd) }
                try r.write(seed: UInt64(20 + n), at: (n % 12) << 20, 1 << 20)
                let run = try TestSupport.run(TestSupport.ploopBinary, ["snapshot-merge", dd], environment: ["PLOOP_TEST_CRASH_AT": "\(n)"])
                if run.code == 0 { break }
                guard try !markers().isEmpty else { continue }
                _ = try Self.ploop("umount", "-d", dev)
                r.devices.names.removeAll { $0 == dev }
                let again = try TestSupport.ploop("mount", dd)
                #expect(again.code == 0 && again.stderr.contains("its clusters are kept"), "\(again)")
                let d = again.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                r.devices.names.append(d)
                #expect(try r.matches(d), "killed at write \(n), then stopped: the bytes changed")
                #expect(try markers().isEmpty)
                #expect(try Self.ploop("snapshot-list", "-H", "-o", "uuid", dd).stdout.split(separator: "\n").count == 1)
                _ = try Self.ploop("umount", dd)
                r.devices.names.removeAll { $0 == d }
                _ = try Self.ploop("check", "-f", dd)
                stopped = true
                break
            }
            #expect(stopped, "no kill left the merge past its flip")
        } }
    }

    /// Online snapshot and online snapshot-merge killed before each of the command's own file
    /// changes in turn, while the device keeps running: the next command on the disk finds the
    /// device's chain and finishes (or, before the journal, has nothing to undo); the device's top
    /// is always a file the descriptor names (never a removed one), and the bytes never change.
    @Test(arguments: TestSupport.cliBackends)
    func onlineCommandsKilledAtEveryWrite(_ backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let r = try RunningDisk(megabytes: 16)
            let (dd, dev) = (r.dd, r.dev)
            var seed: UInt64 = 10
            func write() throws {
                seed += 1
                try r.write(seed: seed, at: Int(seed % 12) << 20, 1 << 20)
            }
            func images() throws -> Int {
                try Self.ploop("snapshot-list", "-H", "-o", "uuid", dd).stdout.split(separator: "\n").count
            }
            try write()
            for command in [["snapshot"], ["snapshot-merge"]] {
                var crashes = 0
                for n in 1...40 {
                    // Each round starts from one image (merge rounds: two), with fresh data.
                    if command == ["snapshot-merge"], try images() == 1 { _ = try Self.ploop("snapshot", dd) }
                    try write()
                    let before = try images()
                    let run = try TestSupport.run(TestSupport.ploopBinary, command + [dd], environment: ["PLOOP_TEST_CRASH_AT": "\(n)"])
                    // The next command on the disk recovers whatever the kill left.
                    let now = try images()
                    #expect(try Self.ploop("info", "-d", dd).stdout.hasPrefix("device:\t\t\(dev)\n"), "\(command) killed at write \(n): the device runs no top the descriptor names")
                    #expect(try r.matches(), "\(command) killed at write \(n): the bytes changed")
                    try write()
                    #expect(try r.matches(), "\(command) killed at write \(n): a write after recovery did not land")
                    if run.code == 0 {
                        #expect(now == before + (command == ["snapshot"] ? 1 : -1))
                        break
                    }
                    #expect(run.code == 137, "\(command) at write \(n): \(run)")
                    crashes += 1
                    #expect(now == before || now == before + (command == ["snapshot"] ? 1 : -1), "\(command) killed at write \(n): \(before) → \(now) images")
                    // Back to one image for the next snapshot round.
                    if command == ["snapshot"], now > 1 { _ = try Self.ploop("snapshot-merge", dd) }
                }
                #expect(crashes >= 3, "\(command): only \(crashes) changes")
            }
            let finalImages = try images()
            #expect(try FileManager.default.contentsOfDirectory(atPath: r.disk).filter { !$0.hasSuffix(".lck") }.count == 1 + finalImages)
            #expect(try r.remountMatches(), "after a remount")
        } }
    }

    /// The device grown offline and then online by the descriptor, over data written through the
    /// raw device: every block written before and after reads back, the new space reads zeros.
    @Test(arguments: TestSupport.cliBackends)
    func growOfflineThenOnlineKeepsEveryBlock(_ backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let r = try RunningDisk(megabytes: 16)
            for i in 0..<4 { try r.write(seed: UInt64(40 + i), at: i * (4 << 20) + 4096 * i, 1 << 20) }
            _ = try Self.ploop("umount", r.dd)
            r.devices.names.removeAll { $0 == r.dev }
            _ = try Self.ploop("grow", "-s", "48m", r.dd)
            let dev = try Self.ploop("mount", r.dd).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            r.devices.names.append(dev)
            r.expected += [UInt8](repeating: 0, count: 32 << 20)
            #expect(try Self.size(dev) == 48 << 20)
            #expect(try Self.read(dev, count: 48 << 20) == r.expected, "after the offline grow")
            let late = DeviceContent.pattern(2 << 20, seed: 50)
            try Self.write(dev, late, at: 40 << 20)
            r.expected.replaceSubrange((40 << 20)..<(42 << 20), with: late)
            _ = try Self.ploop("grow", "-s", "80m", r.dd)
            r.expected += [UInt8](repeating: 0, count: 32 << 20)
            #expect(try Self.size(dev) == 80 << 20)
            let later = DeviceContent.pattern(1 << 20, seed: 51)
            try Self.write(dev, later, at: 79 << 20)
            r.expected.replaceSubrange((79 << 20)..<(80 << 20), with: later)
            #expect(try Self.read(dev, count: 80 << 20) == r.expected, "after the online grow")
            _ = try Self.ploop("umount", r.dd)
            r.devices.names.removeAll { $0 == dev }
            _ = try Self.ploop("check", "-f", r.dd)
            let again = try Self.ploop("mount", r.dd).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            r.devices.names.append(again)
            #expect(try Self.read(again, count: 80 << 20) == r.expected, "after a remount")
        } }
    }

    /// tsnapshot as a backup tool uses it: the running disk's state is frozen on a read-only device
    /// of its own while writes go on; the snapshot is merged back once that device is gone, and
    /// never while it reads it.
    @Test(arguments: TestSupport.cliBackends)
    func temporarySnapshotForBackup(_ backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let r = try RunningDisk(megabytes: 16)
            let (dd, dev) = (r.dd, r.dev)
            try r.write(seed: 1, at: 0, 6 << 20)
            let frozen = r.expected

            let t = try Self.ploop("tsnapshot", "-u", Self.g1, "-c", "backup", dd)
            let lines = t.stdout.split(separator: "\n").map(String.init)
            #expect(lines.count == 2 && lines[0].contains("temporary, for backup"), "\(t)")
            let ro = lines.last ?? ""
            r.devices.names.append(ro)
            #expect(try String(contentsOfFile: dd, encoding: .utf8).contains("<Temporary/>"))
            try r.write(seed: 2, at: 2 << 20, 6 << 20)
            #expect(try Self.read(ro, count: r.size) == frozen, "the temporary snapshot's device changed")
            #expect(try r.matches())
            // The read-only device cannot be written.
            #expect(throws: (any Error).self) { try Self.write(ro, [1, 2, 3], at: 0) }

            // While it is read: merging into the snapshot is refused (nothing changes, no journal left),
            // and a new snapshot keeps it.
            let state = try ScratchDirectoryState(r.disk)
            let refused = try TestSupport.ploop("snapshot-merge", dd)
            // The simulator finds the image locked (23), the kernel's ioctl the device busy (17).
            #expect([23, 17].contains(refused.code) && refused.stderr.contains(dev), "\(refused)")
            #expect(try ScratchDirectoryState(r.disk) == state)
            _ = try Self.ploop("snapshot", "-u", "{22222222-2222-4222-8222-222222222222}", dd)
            #expect(try Self.ploop("snapshot-list", "-H", "-o", "uuid", dd).stdout.split(separator: "\n").count == 3)
            try r.write(seed: 3, at: 12 << 20, 1 << 20)
            #expect(try Self.read(ro, count: r.size) == frozen)

            // The backup is done: the next delete merges the temporary snapshot back too.
            _ = try Self.ploop("umount", "-d", ro)
            r.devices.names.removeAll { $0 == ro }
            let del = try Self.ploop("snapshot-delete", "-u", "{22222222-2222-4222-8222-222222222222}", dd)
            #expect(del.stderr.contains("merging back the temporary snapshot \(Self.g1)"), "\(del)")
            #expect(try Self.ploop("snapshot-list", "-H", "-o", "uuid", dd).stdout == "{5fbaabe3-6958-40ff-92a7-860e329aab41}\n")
            #expect(try !String(contentsOfFile: dd, encoding: .utf8).contains("Temporary"))
            #expect(try r.matches())
            #expect(try r.remountMatches(), "after a remount")
            #expect(try FileManager.default.contentsOfDirectory(atPath: r.disk).filter { !$0.hasSuffix(".lck") }.sorted() == ["DiskDescriptor.xml", "root.hds"])
        } }
    }
}
