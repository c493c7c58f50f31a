import Foundation
import PloopFormat
import PloopImage
import PloopTestSupport
import Testing

/// The balloon on the simulator: real ext4, real FIEMAP, real relocation through the device.
@Suite(.serialized, .enabled(if: TestSupport.simulatorUnavailable == nil, "simulator stack unavailable: \(TestSupport.simulatorUnavailable ?? "")"))
struct BalloonTests {
    typealias Stage = SimulatorTests.Stage

    /// A device with ext4 and `files` files of `mib` MiB of random data; all but the last are then
    /// deleted. The kept file's checksum is recorded beside the image. Returns image, device, mount.
    static func prepare(_ s: Stage, size: String = "1g", files: Int = 7, mib: Int = 100) throws -> (String, String, String) {
        let (img, dev, mnt) = try s.freshExt4(size: size)
        for i in 1...files {
            let r = try TestSupport.sh("dd", "if=/dev/urandom", "of=\(mnt)/f\(i)", "bs=1M", "count=\(mib)", "status=none")
            #expect(r.code == 0, "\(r)")
        }
        s.dir.write("kept.sum", Array(try TestSupport.sh("sha256sum", "\(mnt)/f\(files)").stdout.utf8))
        #expect(try TestSupport.sh("sync").code == 0)
        for i in 1..<files { try FileManager.default.removeItem(atPath: mnt + "/f\(i)") }
        #expect(try TestSupport.sh("sync").code == 0)
        return (img, dev, mnt)
    }

    /// The kept file still has the checksum it had when written.
    static func keptFileIntact(_ s: Stage) throws -> Bool {
        try TestSupport.sh("sha256sum", "-c", s.dir.file("kept.sum")).code == 0
    }

    struct Change: Decodable {
        var oldSize: UInt64
        var newSize: UInt64
        var freeBlocks: Int
        var relocated: Int
        var clustersCut: UInt32
        var bytesCut: UInt64
    }

    static func change(_ size: String, _ mnt: String) throws -> Change {
        let r = try TestSupport.ploop("balloon", "change", "-s", size, "-m", mnt, "--json")
        #expect(r.code == 0, "\(r)")
        try Golden.compareShape(r.stdout, "json/balloon-change.shape.txt")
        let change = try JSONDecoder().decode(Change.self, from: Data(r.stdout.utf8))
        // Blocks moved: the relocation's progress events on stderr, ending at 100%.
        if change.relocated > 0 {
            let events = r.stderr.split(separator: "\n").filter { $0.contains("\"event\":\"progress\"") && $0.contains("\"step\":\"relocating\"") }
            #expect(events.last?.contains("\"percent\":100") == true && events.last?.contains("\"total\":\(change.relocated)") == true, "\(r)")
        }
        return change
    }

    @Test(arguments: TestSupport.balloonBackends)
    func inflateShrinksTheImageAndKeepsEveryFile(_ backend: String) throws {
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let s = try Stage()
            let (img, dev, mnt) = try Self.prepare(s)
            let before = try ImageInfo.read(path: img).fileSize
            #expect(before > 700 << 20)
            for cycle in 0..<2 {
                let r = try Self.change("600m", mnt)
                let after = try ImageInfo.read(path: img).fileSize
                #expect(r.newSize == 600 << 20)
                // The numbers add up: the file shrank by exactly what was cut, and it was a lot.
                if cycle == 0 {
                    #expect(before - after == r.bytesCut, "before \(before) after \(after) cut \(r.bytesCut)")
                    #expect(r.bytesCut > 300 << 20, "cut only \(r.bytesCut)")
                    // Tail blocks moved into the balloon's (so `change` saw relocation progress).
                    #expect(r.relocated > 0, "\(r)")
                }
                #expect(try Self.keptFileIntact(s))
                #expect(try TestSupport.ploop("balloon", "show", "-m", mnt).stdout.contains("\(600 << 20) bytes"))
                #expect(try TestSupport.ploop("balloon", "status", "-d", dev).stdout.contains("OFF"))
                // Deflate: the space goes back to the file system; the image does not change.
                let d = try Self.change("0", mnt)
                #expect(d.newSize == 0)
                #expect(try ImageInfo.read(path: img).fileSize == after)
                // Use some of it again, so the next inflate has something to reclaim.
                #expect(try TestSupport.sh("dd", "if=/dev/urandom", "of=\(mnt)/g\(cycle)", "bs=1M", "count=50", "status=none").code == 0)
                #expect(try TestSupport.sh("sync").code == 0)
                try FileManager.default.removeItem(atPath: mnt + "/g\(cycle)")
            }
            try s.umountFS(mnt)
            let fsck = try TestSupport.sh("e2fsck", "-fn", dev)
            #expect(fsck.code == 0, "\(fsck)")
            try s.umount(dev)
            #expect(try TestSupport.ploop("check", "-f", "-c", img).code == 0)
        } }
    }

    /// dm-ploop has no balloon ioctls: `change` resizes the balloon file only, as the original's
    /// 9.x does (the image keeps its clusters until fstrim gives them back), `show`, `status` and
    /// `complete` answer, the reclaim of the legacy procedure is refused saying why, and every
    /// file stays.
    @Test func balloonOnDMIsAFileOperation() throws {
        try DeviceTestLock.run { try TestSupport.withBackend("dm-fake") {
            let s = try Stage()
            let (img, dev, mnt) = try Self.prepare(s, size: "512m", files: 3, mib: 64)
            let before = try ImageInfo.read(path: img).fileSize
            let r = try TestSupport.ploop("balloon", "change", "-s", "100m", "-m", mnt)
            #expect(r.code == 0 && r.stdout.contains("no balloon ioctls"), "\(r)")
            let j = try TestSupport.ploop("balloon", "change", "-s", "120m", "-m", mnt, "--json")
            let change = try JSONDecoder().decode(Change.self, from: Data(j.stdout.utf8))
            #expect(change.oldSize == 100 << 20 && change.newSize == 120 << 20 && change.bytesCut == 0 && change.relocated == 0, "\(j)")
            #expect(try ImageInfo.read(path: img).fileSize == before)
            #expect(try TestSupport.ploop("balloon", "show", "-m", mnt).stdout.contains("\(120 << 20) bytes"))
            #expect(try TestSupport.ploop("balloon", "status", "-d", dev).stdout.contains("OFF"))
            let complete = try TestSupport.ploop("balloon", "complete", "-d", dev)
            #expect(complete.code == 0 && complete.stdout.contains("Nothing to complete"), "\(complete)")
            let repair = try TestSupport.ploop("balloon", "repair", "-m", mnt)
            #expect(repair.code != 0 && repair.stderr.contains("no balloon ioctls"), "\(repair)")
            #expect(try Self.keptFileIntact(s))
            // Deflated again: the file system has its space back.
            let d = try TestSupport.ploop("balloon", "change", "-s", "0", "-m", mnt)
            #expect(d.code == 0, "\(d)")
            #expect(try TestSupport.ploop("balloon", "show", "-m", mnt).stdout.contains(" 0 bytes"))
            try s.finishClean(image: img, device: dev, mount: mnt)
        } }
    }

    @Test func refusals() throws {
        try DeviceTestLock.run {
            let s = try Stage()
            let (img, dev, mnt) = try Self.prepare(s)
            let before = s.dir.read("root.hdd").count
            // Larger than the free space: nothing changes.
            let big = try TestSupport.ploop("balloon", "change", "-s", "1g", "-m", mnt)
            #expect(big.code == 38)
            #expect(big.stderr.contains("free"), "\(big)")
            #expect(try TestSupport.ploop("balloon", "show", "-m", mnt).stdout.contains(" 0 bytes"))
            #expect(try TestSupport.ploop("balloon", "status", "-d", dev).stdout.contains("OFF"))
            // A mount point of another file system.
            let other = try TestSupport.ploop("balloon", "change", "-s", "10m", "-d", dev, "-m", "/")
            #expect(other.code == 38)
            #expect(other.stderr.contains("not a mount point of"), "\(other)")
            // While tracking (a maintenance in progress): busy, and nothing changes.
            #expect(s.dir.read("root.hdd").count == before)
            try s.umountFS(mnt)
            try s.umount(dev)
            _ = img
        }
    }

    /// The procedure stopped after each of its steps (the test hook exits the process there, as a
    /// kill would); `status` says where it stopped; `complete` or `clear` finishes; nothing is lost.
    @Test(arguments: ["inflate", "fbload"])
    func interruptedThenFinished(_ step: String) throws {
        try DeviceTestLock.run {
            let s = try Stage()
            let (img, dev, mnt) = try Self.prepare(s, size: "512m", files: 4, mib: 100)
            let r = try TestSupport.run(TestSupport.ploopBinary, ["balloon", "change", "-s", "280m", "-m", mnt], environment: ["PLOOP_TEST_BALLOON_STOP_AFTER": step])
            #expect(r.code == 9, "\(r)")
            let status = try TestSupport.ploop("balloon", "status", "-d", dev).stdout
            if step == "inflate" {
                #expect(status.contains("BALLOON"), "\(status)")
                // Another operation is refused until the stale state is cleared.
                #expect(try TestSupport.ploop("snapshot", "-d", dev, s.dir.file("snap")).code != 0)
                #expect(try TestSupport.ploop("balloon", "clear", "-d", dev).code == 0)
                // The balloon is inflated; repair gives back what lies under it.
                let rep = try TestSupport.ploop("balloon", "repair", "-m", mnt)
                #expect(rep.code == 0, "\(rep)")
                #expect(rep.stdout.contains("TRUNCATED"))
            } else {
                #expect(status.contains("FBLOADED"), "\(status)")
                let c = try TestSupport.ploop("balloon", "complete", "-d", dev)
                #expect(c.code == 0, "\(c)")
                #expect(c.stdout.contains("TRUNCATED"))
            }
            #expect(try TestSupport.ploop("balloon", "status", "-d", dev).stdout.contains("OFF"))
            #expect(try ImageInfo.read(path: img).fileSize < 300 << 20)
            #expect(try Self.keptFileIntact(s))
            try s.finishClean(image: img, device: dev, mount: mnt)
        }
    }

    /// A real SIGKILL of the CLI at whatever point it has reached; then the state tells what to do.
    @Test func sigkillOfTheCommand() throws {
        try DeviceTestLock.run {
            let s = try Stage()
            let (img, dev, mnt) = try Self.prepare(s)
            let p = Process()
            p.executableURL = URL(fileURLWithPath: TestSupport.ploopBinary)
            p.arguments = ["balloon", "change", "-s", "600m", "-m", mnt]
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            usleep(60_000)
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            let status = try TestSupport.ploop("balloon", "status", "-d", dev).stdout
            if status.contains("FBLOADED") || status.contains("RELOC") {
                #expect(try TestSupport.ploop("balloon", "complete", "-d", dev).code == 0)
            } else if status.contains("BALLOON") {
                #expect(try TestSupport.ploop("balloon", "clear", "-d", dev).code == 0)
            }
            #expect(try TestSupport.ploop("balloon", "status", "-d", dev).stdout.contains("OFF"))
            // Whatever was reached, repair finishes the job; it reports as change does.
            let repaired = try TestSupport.ploop("balloon", "repair", "-m", mnt, "--json")
            #expect(repaired.code == 0, "\(repaired)")
            if repaired.code == 0 { try Golden.compareShape(repaired.stdout, "json/balloon-change.shape.txt") }
            #expect(try Self.keptFileIntact(s))
            try s.finishClean(image: img, device: dev, mount: mnt)
        }
    }
}
