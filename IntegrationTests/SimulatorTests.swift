import Foundation
import PloopFormat
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

/// The simulator end to end, as root: real FUSE, loop devices, ext4, e2fsck. Everything a test
/// creates (devices, mounts) it removes by its exact name, even when it fails.
@Suite(.serialized, .enabled(if: TestSupport.simulatorUnavailable == nil, "simulator stack unavailable: \(TestSupport.simulatorUnavailable ?? "")"))
struct SimulatorTests {
    /// A scratch directory plus the devices and mounts made in it, torn down in reverse.
    final class Stage: @unchecked Sendable {
        let dir: ScratchDirectory
        var devices: [String] = []
        var mounts: [String] = []

        init() throws { dir = try ScratchDirectory("ploop-sim") }

        deinit {
            // Even after a failure: our mounts (retrying while something lets go, lazily at the
            // end) and our devices, each by its exact name.
            for m in mounts.reversed() {
                var done = false
                for _ in 0..<20 where !done {
                    done = (try? TestSupport.sh("umount", m))?.code == 0
                    if !done { usleep(100_000) }
                }
                if !done { _ = try? TestSupport.sh("umount", "-l", m) }
            }
            for d in devices.reversed() { _ = try? TestSupport.ploop("umount", "-d", d) }
        }

        func ploop(_ args: String..., sourceLocation: SourceLocation = #_sourceLocation) throws -> String {
            let r = try TestSupport.ploop(args)
            #expect(r.code == 0, "ploop \(args.joined(separator: " ")): \(r)", sourceLocation: sourceLocation)
            return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        }

        func mount(_ images: [String], extra: [String] = []) throws -> String {
            let r = try TestSupport.ploop(["mount"] + extra + images)
            guard r.code == 0 else { throw CommandError(message: "mount: \(r)") }
            let dev = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            devices.append(dev)
            return dev
        }

        func umount(_ dev: String) throws {
            let r = try TestSupport.ploop("umount", "-d", dev)
            #expect(r.code == 0, "\(r)")
            devices.removeAll { $0 == dev }
        }

        func mountFS(_ dev: String, _ name: String) throws -> String {
            let m = dir.file(name)
            try FileManager.default.createDirectory(atPath: m, withIntermediateDirectories: true)
            let r = try TestSupport.sh("mount", dev, m)
            guard r.code == 0 else { throw CommandError(message: "mount \(dev): \(r)") }
            mounts.append(m)
            return m
        }

        func umountFS(_ m: String) throws {
            let r = try TestSupport.sh("umount", m)
            #expect(r.code == 0, "\(r)")
            mounts.removeAll { $0 == m }
        }

        /// A new image of `size` on a device, with ext4 made and mounted. Returns (image, device, mount).
        func freshExt4(size: String, mountName: String = "mnt") throws -> (String, String, String) {
            let image = dir.file("root.hdd")
            _ = try ploop("init", "--no-descriptor", "-s", size, image)
            let dev = try mount([image])
            #expect(try TestSupport.sh("mkfs.ext4", "-q", "-F", dev).code == 0)
            return (image, dev, try mountFS(dev, mountName))
        }

        /// Unmounts the file system (which must check clean), stops the device, checks the image.
        func finishClean(image: String, device: String, mount: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            try umountFS(mount)
            let fsck = try TestSupport.sh("e2fsck", "-fn", device)
            #expect(fsck.code == 0, "\(fsck)", sourceLocation: sourceLocation)
            try umount(device)
            let check = try TestSupport.ploop("check", "-f", image)
            #expect(check.code == 0, "\(check)", sourceLocation: sourceLocation)
        }
    }

    struct CommandError: Error, CustomStringConvertible { var message: String; var description: String { message } }

    /// Files with known contents, written while maintenance runs.
    final class FileWriter: @unchecked Sendable {
        let dir: String
        private let lock = NSLock()
        private var written: [String: UInt64] = [:]
        private var stopFlag = false
        private let done = DispatchSemaphore(value: 0)
        init(_ dir: String) { self.dir = dir }

        func start(prefix: String) {
            Thread { [self] in
                var i: UInt64 = 0
                while true {
                    lock.lock(); let stop = stopFlag; lock.unlock()
                    if stop { break }
                    let name = "\(prefix)-\(i).bin"
                    let seed = i &* 7919 &+ UInt64(prefix.utf8.reduce(0) { $0 &* 31 &+ Int($1) })
                    let bytes = Data(Self.content(seed: seed, size: 256 << 10))
                    if FileManager.default.createFile(atPath: dir + "/" + name, contents: bytes) {
                        lock.lock(); written[name] = seed; lock.unlock()
                    }
                    i += 1
                }
                done.signal()
            }.start()
        }

        func stop() {
            lock.lock(); stopFlag = true; lock.unlock()
            done.wait()
            lock.lock(); stopFlag = false; lock.unlock()
        }

        static func content(seed: UInt64, size: Int) -> [UInt8] {
            var x = seed | 1
            return (0..<size).map { _ in x ^= x << 13; x ^= x >> 7; x ^= x << 17; return UInt8(truncatingIfNeeded: x) }
        }

        /// Every file written verifies, in the directory `root` (which may be a remount).
        func verify(in root: String, sourceLocation: SourceLocation = #_sourceLocation) -> Int {
            lock.lock(); let all = written; lock.unlock()
            for (name, seed) in all {
                let got = FileManager.default.contents(atPath: root + "/" + name)
                #expect(got == Data(Self.content(seed: seed, size: 256 << 10)), "\(name)", sourceLocation: sourceLocation)
            }
            return all.count
        }
    }

    struct DeviceSummary: Decodable { var device: String; var backend: String }

    @Test(arguments: TestSupport.cliBackends)
    func manualFlowWithWritersDuringMaintenance(_ backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let s = try Stage()
            let (base, dev, mnt) = try s.freshExt4(size: "512m")
            let w = FileWriter(mnt)
            // Snapshot twice while a writer runs, then merge 0..2 (into the base, which becomes the top).
            w.start(prefix: "a")
            Thread.sleep(forTimeInterval: 0.3)
            _ = try s.ploop("snapshot", "-d", dev, s.dir.file("root.hdd.1"))
            Thread.sleep(forTimeInterval: 0.3)
            _ = try s.ploop("snapshot", "-d", dev, s.dir.file("root.hdd.2"))
            Thread.sleep(forTimeInterval: 0.3)
            let merged = try TestSupport.ploop("merge", "--json", "-d", dev, "-l", "0..2")
            #expect(merged.code == 0, "\(merged)")
            try Golden.compareShape(merged.stdout, "json/merge-online.shape.txt")
            w.stop()
            let list = try TestSupport.ploop("list", "--json")
            #expect(list.stdout.contains(base) && !list.stdout.contains("root.hdd.1\""))
            // log: simulator devices only; mergeProgress: while an online merge runs.
            try Golden.compareShape(list.stdout, "json/list.shape.txt", optional: [".[].log: string", ".[].mergeProgress: object", ".[].mergeProgress.done: number", ".[].mergeProgress.total: number"])
            // The backend under test served the device.
            // (Only this test's device: the host may run others, ours or not.)
            let served = try JSONDecoder().decode([DeviceSummary].self, from: Data(list.stdout.utf8)).filter { $0.device == dev }
            #expect(served.map(\.backend) == [["kernel-fake": "kernel", "dm-fake": "dm-ploop"][backend] ?? "simulator"], "\(list)")
            // Two more snapshots, then 1..2 and 0..1 under the writer.
            w.start(prefix: "b")
            _ = try s.ploop("snapshot", "-d", dev, s.dir.file("root.hdd.3"))
            Thread.sleep(forTimeInterval: 0.2)
            _ = try s.ploop("snapshot", "-d", dev, s.dir.file("root.hdd.4"))
            Thread.sleep(forTimeInterval: 0.2)
            _ = try s.ploop("merge", "-d", dev, "-l", "1..2")
            Thread.sleep(forTimeInterval: 0.2)
            _ = try s.ploop("merge", "-d", dev, "-l", "0..1")
            w.stop()
            // Grow online: the kernel sees the new size at once.
            _ = try s.ploop("grow", "-s", "768m", "-d", dev)
            #expect(try TestSupport.sh("blockdev", "--getsize64", dev).stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(768 << 20)")
            if TestSupport.canResizeOnline {
                #expect(try TestSupport.sh("resize2fs", dev).code == 0)
            }
            let files = w.verify(in: mnt)
            #expect(files > 5)
            try s.umountFS(mnt)
            if !TestSupport.canResizeOnline {
                // No CAP_SYS_RESOURCE here (a sandbox): resize the file system offline instead.
                #expect(try TestSupport.sh("e2fsck", "-fy", dev).code <= 1)
                #expect(try TestSupport.sh("resize2fs", dev).code == 0)
            }
            let fsck = try TestSupport.sh("e2fsck", "-fn", dev)
            #expect(fsck.code == 0, "\(fsck)")
            try s.umount(dev)
            // Only the base is left; it checks clean and, remounted, holds every file.
            let check = try TestSupport.ploop("check", "-f", "-c", base)
            #expect(check.code == 0, "\(check)")
            let dev2 = try s.mount([base])
            let mnt2 = try s.mountFS(dev2, "mnt2")
            #expect(w.verify(in: mnt2) == files)
            let df = try TestSupport.sh("df", "-B1", "--output=size", mnt2)
            #expect((UInt64(df.stdout.split(separator: "\n").last.map { $0.trimmingCharacters(in: .whitespaces) } ?? "") ?? 0) > 600 << 20)
            try s.umountFS(mnt2)
            try s.umount(dev2)
        } }
    }

    @Test func rawBaseWithDeltas() throws {
        try DeviceTestLock.run {
            let s = try Stage()
            let base = s.dir.file("base.raw")
            _ = try s.ploop("init", "--no-descriptor", "-f", "raw", "-s", "256m", base)
            let dev = try s.mount([base], extra: ["-f", "raw"])
            #expect(try TestSupport.sh("mkfs.ext4", "-q", "-F", dev).code == 0)
            var mnt = try s.mountFS(dev, "m")
            let w = FileWriter(mnt)
            w.start(prefix: "r")
            Thread.sleep(forTimeInterval: 0.2)
            _ = try s.ploop("snapshot", "-d", dev, s.dir.file("d1"))
            Thread.sleep(forTimeInterval: 0.2)
            w.stop()
            try s.umountFS(mnt)
            try s.umount(dev)
            let rawBefore = s.dir.read("base.raw")
            let dev2 = try s.mount([base, s.dir.file("d1")], extra: ["-f", "raw"])
            mnt = try s.mountFS(dev2, "m2")
            _ = w.verify(in: mnt)
            try s.umountFS(mnt)
            // Merge the delta into the raw base online: the raw base becomes the top.
            _ = try s.ploop("merge", "-d", dev2)
            try s.umount(dev2)
            #expect(s.dir.read("base.raw") != rawBefore)
            let dev3 = try s.mount([base], extra: ["-f", "raw"])
            mnt = try s.mountFS(dev3, "m3")
            _ = w.verify(in: mnt)
            try s.umountFS(mnt)
            #expect(try TestSupport.sh("e2fsck", "-fn", dev3).code == 0)
            try s.umount(dev3)
        }
    }

    @Test func sigkillOfTheDaemonThenRecovery() throws {
        try DeviceTestLock.run {
            let s = try Stage()
            let (base, dev, mnt) = try s.freshExt4(size: "256m")
            let w = FileWriter(mnt)
            w.start(prefix: "k")
            Thread.sleep(forTimeInterval: 0.2)
            #expect(try TestSupport.sh("sync").code == 0)
            let synced = w.verify(in: mnt)
            Thread.sleep(forTimeInterval: 0.2)
            // Kill the daemon serving this device (by the pid it recorded), mid-write.
            let n = Int(dev.dropFirst("/dev/ploop".count))!
            let state = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "/run/ploop/ploop\(n)/state.json"))) as! [String: Any]
            let pid = Int32(state["pid"] as! Int)
            #expect(kill(pid, SIGKILL) == 0)
            w.stop()
            _ = try TestSupport.sh("umount", "-l", mnt)
            s.mounts.removeAll()
            let listed = try TestSupport.ploop("list")
            #expect(listed.stdout.split(separator: "\n").contains { $0.hasPrefix(dev + " ") && $0.contains("DEAD") }, "\(listed)")
            // umount of the dead device cleans up; the image is left dirty and passes check -d.
            try s.umount(dev)
            #expect(!FileManager.default.fileExists(atPath: dev))
            #expect(try ImageInfo.read(path: base).inUse)
            let check = try TestSupport.ploop("check", "-d", "-r", base)
            #expect(check.code != 0 || check.stdout.contains("dirty"))
            // A new mount checks the dirty image first, then works; what was synced is there.
            let dev2 = try s.mount([base])
            #expect(try TestSupport.sh("e2fsck", "-fy", dev2).code <= 1)
            let mnt2 = try s.mountFS(dev2, "m2")
            #expect(synced > 0)
            try s.finishClean(image: base, device: dev2, mount: mnt2)
        }
    }

    @Test(arguments: TestSupport.cliBackends)
    func secondMountAndBadImagesAreRefusedLeavingNothing(_ backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let s = try Stage()
            let base = s.dir.file("root.hdd")
            _ = try s.ploop("init", "--no-descriptor", "-s", "64m", base)
            let delta = s.dir.file("root.hdd.1")
            _ = try s.ploop("init", "--no-descriptor", "-s", "64m", delta)
            s.dir.write("corrupt.hdd", [UInt8](repeating: 7, count: 1 << 20))
            let before = try s.dir.snapshot()
            let runBefore = Set((try? FileManager.default.contentsOfDirectory(atPath: "/run/ploop")) ?? [])
            let loopsBefore = try TestSupport.sh("losetup", "-a").stdout
            let dev = try s.mount([base, delta])
            let snapshotWhileMounted = try s.dir.snapshot()
            for (args, words) in [
                ([base], "in use"), ([delta], "in use"), ([s.dir.file("missing.hdd")], "no such file"),
                ([s.dir.file("corrupt.hdd")], "not a ploop1 image"), ([s.dir.file("corrupt.hdd"), delta], "in use"),
            ] {
                let r = try TestSupport.ploop(["mount"] + args)
                #expect(r.code != 0, "\(args)")
                #expect(r.stderr.contains(words), "\(args): \(r)")
            }
            // A mount onto a device that is taken is refused too.
            let r = try TestSupport.ploop("mount", "-d", dev, s.dir.file("corrupt.hdd"))
            #expect(r.code != 0)
            #expect(try s.dir.snapshot() == snapshotWhileMounted)
            try s.umount(dev)
            // Nothing left: no runtime directory, loop device, FUSE mount or node of ours.
            let runAfter = Set((try? FileManager.default.contentsOfDirectory(atPath: "/run/ploop")) ?? [])
            #expect(runAfter == runBefore)
            #expect(try TestSupport.sh("losetup", "-a").stdout == loopsBefore)
            #expect(!FileManager.default.fileExists(atPath: dev))
            let mounts = try String(contentsOfFile: "/proc/mounts", encoding: .utf8)
            #expect(!mounts.contains("/run/ploop/\(dev.dropFirst("/dev/".count))/"), "\(mounts)")
            #expect(try s.dir.snapshot() == before)
        } }
    }

    /// Single 768 KiB and 1 MiB direct-I/O writes through the loop device land byte for byte
    /// (qemu 7.2's FUSE export corrupts exactly these).
    /// fstrim inside the container gives the space of deleted files back to the host: the image
    /// file shrinks on disk, checks clean, and the files left keep their bytes.
    @Test(arguments: TestSupport.cliBackends)
    func fstrimGivesSpaceBackToTheHost(_ backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let s = try Stage()
            let (img, dev, mnt) = try s.freshExt4(size: "512m")
            #expect(try TestSupport.sh("dd", "if=/dev/urandom", "of=\(mnt)/keep", "bs=1M", "count=20", "status=none").code == 0)
            #expect(try TestSupport.sh("dd", "if=/dev/urandom", "of=\(mnt)/gone", "bs=1M", "count=150", "status=none").code == 0)
            #expect(try TestSupport.sh("sync").code == 0)
            let sum = try TestSupport.sh("sha256sum", "\(mnt)/keep").stdout
            func onDisk() throws -> UInt64 { try UInt64(File(path: img, mode: .readOnly).stat().st_blocks) * 512 }
            let full = try onDisk()
            try FileManager.default.removeItem(atPath: mnt + "/gone")
            // Blocks freed in a running journal transaction are not trimmed: commit it first.
            #expect(try TestSupport.sh("sync").code == 0)
            let trim = try TestSupport.sh("fstrim", "-v", mnt)
            #expect(trim.code == 0, "\(trim)")
            #expect(try TestSupport.sh("sync").code == 0)
            let trimmed = try onDisk()
            #expect(full >= trimmed + (140 << 20), "on disk \(full) → \(trimmed) bytes")
            #expect(try TestSupport.sh("sha256sum", "\(mnt)/keep").stdout == sum)
            try s.finishClean(image: img, device: dev, mount: mnt)
        } }
    }

    @Test func largeDirectWritesLandExactly() throws {
        try DeviceTestLock.run {
            let s = try Stage()
            let base = s.dir.file("root.hdd")
            _ = try s.ploop("init", "--no-descriptor", "-s", "64m", base)
            let dev = try s.mount([base])
            var expected = [UInt8](repeating: 0, count: 64 << 20)
            for (i, (size, at)) in [(768 << 10, 1 << 20), (1 << 20, 8 << 20), (768 << 10, (20 << 20) + 4096), (4 << 20, 40 << 20)].enumerated() {
                let data = FileWriter.content(seed: UInt64(i + 1), size: size)
                s.dir.write("pattern\(i)", data)
                let r = try TestSupport.sh("dd", "if=" + s.dir.file("pattern\(i)"), "of=" + dev, "bs=\(size)", "count=1", "oflag=direct,seek_bytes", "seek=\(at)", "conv=notrunc", "status=none")
                #expect(r.code == 0, "\(r)")
                expected.replaceSubrange(at..<at + size, with: data)
            }
            // Read back through the device with direct I/O too.
            let back = try TestSupport.sh("dd", "if=" + dev, "of=" + s.dir.file("back"), "bs=1M", "iflag=direct", "status=none")
            #expect(back.code == 0)
            #expect(s.dir.read("back") == expected)
            try s.umount(dev)
            // And the image itself holds exactly those bytes (read with our engine offline).
            let image = try Ploop1Image(file: try ImagePath.open(base, write: false), writable: false)
            var got = [UInt8](repeating: 0, count: 64 << 20)
            for c in 0..<64 {
                var cluster = [UInt8](repeating: 0, count: 1 << 20)
                _ = try cluster.withUnsafeMutableBytes { try image.read(cluster: ClusterIndex(UInt64(c)), into: $0) }
                got.replaceSubrange(c << 20..<(c + 1) << 20, with: cluster)
            }
            #expect(got == expected)
            #expect(try TestSupport.ploop("check", "-f", base).code == 0)
        }
    }

    @Test func userMadeNodeIsServedAndRestored() throws {
        try DeviceTestLock.run {
            let s = try Stage()
            let base = s.dir.file("root.hdd")
            _ = try s.ploop("init", "--no-descriptor", "-s", "64m", base)
            // The manual's node for the kernel driver, on a kernel without it.
            let free = (0..<4096).first { !FileManager.default.fileExists(atPath: "/dev/ploop\($0)") && !FileManager.default.fileExists(atPath: "/run/ploop/ploop\($0)") }!
            let node = "/dev/ploop\(free)"
            #expect(try TestSupport.sh("mknod", node, "b", "182", "\(free * 16)").code == 0)
            defer { unlink(node) }
            let dev = try s.mount([base], extra: ["-d", node])
            #expect(dev == node)
            #expect(try TestSupport.sh("blockdev", "--getsize64", node).stdout.hasPrefix("\(64 << 20)"))
            try s.umount(dev)
            // The user's node is back as it was.
            let st = try TestSupport.sh("stat", "-c", "%t:%T", node).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(st == String(format: "b6:%x", free * 16))
        }
    }

    /// `ploop -v 4 mount` asks the daemon for a line per request in its log; `ploop list` says
    /// where the log is; a device mounted without it logs only its life (serving, stopped).
    @Test func daemonLogsEveryRequestWhenAsked() throws {
        try DeviceTestLock.run {
            let s = try Stage()
            for (name, verbose) in [("quiet.hdd", false), ("loud.hdd", true)] {
                let image = s.dir.file(name)
                _ = try s.ploop("init", "--no-descriptor", "-s", "64m", image)
                // The loud one with --json: the device document (its shape is recorded).
                let r = try TestSupport.ploop((verbose ? ["-v", "4"] : []) + ["mount", "--backend", "simulator"] + (verbose ? ["--json"] : []) + [image])
                #expect(r.code == 0, "\(r)")
                var dev = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                if verbose {
                    dev = (try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])?["device"] as? String ?? ""
                    try Golden.compareShape(r.stdout, "json/mount.shape.txt", optional: [".mergeProgress: object", ".mergeProgress.done: number", ".mergeProgress.total: number"])
                }
                guard r.code == 0, dev.hasPrefix("/dev/ploop") else { return }
                s.devices.append(dev)
                #expect(verbose == r.stderr.contains("debug ploop: "), "\(r)")
                // A request the daemon answers.
                _ = try s.ploop("snapshot", "-d", dev, s.dir.file(name + ".1"))
                let list = try TestSupport.ploop("list")
                let block = list.stdout.components(separatedBy: dev).dropFirst().first ?? ""
                guard let line = block.split(separator: "\n").first(where: { $0.hasPrefix("  log ") }) else {
                    Issue.record("ploop list names no log for \(dev): \(list)")
                    continue
                }
                let log = (try? String(contentsOfFile: String(line.dropFirst("  log ".count)), encoding: .utf8)) ?? ""
                #expect(log.contains("info ploop.daemon") && log.contains("serving"), "\(log)")
                #expect(log.range(of: #"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"#, options: [.regularExpression, .anchored]) != nil, "no timestamp: \(log)")
                #expect(verbose == (log.contains("debug ploop.daemon") && log.contains("request") && log.contains("snapshot")), "\(log)")
                try s.umount(dev)
            }
        }
    }

    /// `snapshot -d` killed at each write before the driver takes the new delta over (the kernel
    /// backend, whose user space makes the delta; the fake driver answers). Nothing but a whole
    /// image ever appears under the new name, and the retry succeeds. Before, a kill before the
    /// header was written left a 0-byte NEWDELTA that `check` calls fatal and a retry refused
    /// ("already exists").
    @Test func snapshotKilledWhileMakingItsDeltaLeavesNoHalfFile() throws {
        try DeviceTestLock.run { try TestSupport.withBackend("kernel-fake") {
            let s = try Stage()
            let base = s.dir.file("base.hdd")
            _ = try s.ploop("init", "--no-descriptor", "-s", "64m", base)
            let dev = try s.mount([base])
            var level = 0
            for n in 1...8 {
                let delta = s.dir.file("d\(n).hdd")
                let run = try TestSupport.run(TestSupport.ploopBinary, ["snapshot", "-d", dev, delta], environment: ["PLOOP_TEST_CRASH_AT": "\(n)"])
                if run.code == 0 {
                    level += 1  // this many writes finish the command
                } else {
                    #expect(run.code == 137, "write \(n): \(run)")
                    let kind = PathInfo.kind(delta)
                    if kind != .missing {
                        // Killed after the rename: a whole empty delta, which check accepts.
                        let check = try TestSupport.ploop("check", "-r", delta)
                        #expect(check.code == 0, "write \(n) left \(delta) that check refuses: \(check)")
                        continue
                    }
                    let retry = try TestSupport.ploop("snapshot", "-d", dev, delta)
                    #expect(retry.code == 0, "write \(n): the retry was refused: \(retry)")
                    if retry.code == 0 { level += 1 }
                }
                // The builder's leftovers are gone once the name was made again.
                let names = try FileManager.default.contentsOfDirectory(atPath: s.dir.path)
                #expect(!names.contains { $0.hasPrefix("d\(n).hdd.new-") }, "write \(n): \(names)")
            }
            let list = try TestSupport.ploop("list", "--json")
            #expect(list.code == 0 && list.stdout.contains("d8.hdd"), "\(list)")
            #expect(level >= 1)
            try s.umount(dev)
        } }
    }


    /// A process holding the device open (raw, no file system) keeps it running: umount waits for
    /// it to let go (up to PLOOP_UMOUNT_TIMEOUT seconds, 60 by default), then refuses and names
    /// it, as the kernel driver refuses STOP while the device is open. Before, the simulator's
    /// umount pulled the device from under the holder, whose next write failed with EIO.
    @Test(arguments: TestSupport.cliBackends.filter { $0 != "kernel" })
    func umountWaitsForWhatHoldsTheDeviceAndNamesIt(_ backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let s = try Stage()
            let image = s.dir.file("held.hdd")
            _ = try s.ploop("init", "--no-descriptor", "-s", "64m", image)
            let dev = try s.mount([image])
            /// `sleep` with the device open on descriptor 3, started and ended by its PID.
            func holder(seconds: Int) throws -> Int32 {
                let pid = try Spawn.start("/bin/sh", arguments: ["sh", "-c", "exec sleep \(seconds) 3<>\"$0\"", dev], environment: Spawn.environment)
                for _ in 0..<200 where !BlockNode.openers(dev).contains(where: { $0.pid == pid && $0.command == "sleep" }) { usleep(10_000) }
                return pid
            }
            let stubborn = try holder(seconds: 60)
            defer {
                kill(stubborn, SIGKILL)
                _ = try? Spawn.wait(stubborn)
            }
            let refused = try TestSupport.run(TestSupport.ploopBinary, ["umount", "-d", dev], environment: ["PLOOP_UMOUNT_TIMEOUT": "1"])
            #expect(refused.code == 17, "\(refused)")
            #expect(refused.stderr.contains("held open by \(stubborn) (sleep)"), "\(refused)")
            #expect(try TestSupport.ploop("list").stdout.contains(dev), "the device must still run")
            kill(stubborn, SIGKILL)
            _ = try? Spawn.wait(stubborn)
            // One that lets go in a second: the umount waits for it and succeeds.
            let brief = try holder(seconds: 1)
            try s.umount(dev)
            // It returned only once the holder had let go: the holder has ended by now.
            #expect(Spawn.reapIfEnded(brief) != nil, "umount succeeded while \(brief) still held \(dev)")
        } }
    }


    /// state.json is written when what it says changes, not after every request: `ploop list`
    /// asks each daemon for its info, and that rewrote (and fsynced) the file every time.
    @Test func stateFileIsWrittenOnlyWhenTheStateChanges() throws {
        try DeviceTestLock.run {
            let s = try Stage()
            let image = s.dir.file("state.hdd")
            _ = try s.ploop("init", "--no-descriptor", "-s", "64m", image)
            let dev = try s.mount([image])
            guard let n = Int(dev.dropFirst("/dev/ploop".count)) else { Issue.record("device \(dev)"); return }
            let state = (ProcessInfo.processInfo.environment["PLOOP_RUN_DIR"] ?? "/run/ploop") + "/ploop\(n)/state.json"
            // A mark only a rewrite removes: trailing blanks, which JSON readers skip.
            let mark = "\n \n"
            let original = (try? String(contentsOfFile: state, encoding: .utf8)) ?? ""
            #expect(!original.isEmpty, "no \(state)")
            try (original + mark).write(toFile: state, atomically: true, encoding: .utf8)
            for _ in 0..<3 { #expect(try TestSupport.ploop("list").stdout.contains(dev)) }
            let after = (try? String(contentsOfFile: state, encoding: .utf8)) ?? ""
            #expect(after.hasSuffix(mark), "state.json was rewritten by requests that changed nothing")
            _ = try s.ploop("snapshot", "-d", dev, s.dir.file("state.1.hdd"))
            let text = (try? String(contentsOfFile: state, encoding: .utf8)) ?? ""
            #expect(text.contains("state.1.hdd") && !text.hasSuffix(mark), "state.json missed the new top: \(text)")
            try s.umount(dev)
        }
    }

}
