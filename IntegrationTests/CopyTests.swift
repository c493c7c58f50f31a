import Foundation
import PloopImage
import PloopTestSupport
import Testing

/// `ploop copy` of a mounted ext4 with a writer running (random data, and zeros over data), locally
/// and through a pipe; `-F` stops the writer. The copy checks clean, mounts, and its files equal
/// the source's at the freeze.
@Suite(.serialized, .enabled(if: TestSupport.simulatorUnavailable == nil, "simulator stack unavailable: \(TestSupport.simulatorUnavailable ?? "")"))
struct CopyTests {
    typealias Stage = SimulatorTests.Stage

    /// A shell writer: random data into 40 rotating files, and zeros written over earlier ones.
    static func startWriter(_ mnt: String) throws -> Process {
        // Foundation starts it as a process group leader: -F stops the group, the shell and any
        // dd it is running.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", """
            i=0; while true; do
              dd if=/dev/urandom of=\(mnt)/w$((i % 40)) bs=64k count=8 status=none
              [ $i -gt 2 ] && dd if=/dev/zero of=\(mnt)/w$(((i - 2) % 40)) bs=64k count=4 conv=notrunc status=none
              i=$((i+1))
              sleep 0.01
            done
            """]
        try p.run()
        #expect(getpgid(p.processIdentifier) == p.processIdentifier, "the writer must lead its own process group")
        return p
    }

    /// Kills the writer's whole group and waits until every member is gone. Idempotent.
    static func end(_ writer: Process) {
        let group = writer.processIdentifier
        kill(-group, SIGKILL)
        kill(-group, SIGCONT)
        writer.waitUntilExit()
        for _ in 0..<200 where kill(-group, 0) == 0 { usleep(10_000) }
    }

    static func sums(_ dir: String) throws -> String {
        try TestSupport.run("/bin/sh", ["-c", "cd \(dir) && sha256sum $(ls | grep -v lost+found | sort)"]).stdout
    }

    @Test(arguments: ["local", "pipe", "local kernel-fake", "pipe kernel-fake"] + (TestSupport.which("socat") != nil ? ["tcp"] : []))
    func copyWhileWriting(_ modeAndBackend: String) throws {
        let mode = String(modeAndBackend.split(separator: " ")[0])
        let backend = modeAndBackend.hasSuffix("kernel-fake") ? "kernel-fake" : "simulator"
        try DeviceTestLock.run { try TestSupport.withBackend(backend) {
            let s = try Stage()
            let (img, dev, mnt) = try s.freshExt4(size: "256m")
            #expect(try TestSupport.sh("dd", "if=/dev/urandom", "of=\(mnt)/base", "bs=1M", "count=40", "status=none").code == 0)
            let writer = try Self.startWriter(mnt)
            defer { Self.end(writer) }
            Thread.sleep(forTimeInterval: 0.3)
            let copy = s.dir.file("copy.hdd")
            // -F stops the writer (SIGSTOP keeps it from writing while frozen and after).
            let stop = "/bin/kill -s STOP -- -\(writer.processIdentifier)"
            let r: TestSupport.Result
            if mode == "local" {
                r = try TestSupport.ploop("copy", "-s", dev, "-d", copy, "-F", stop, "--json")
                if r.code == 0 { try Golden.compareShape(r.stdout, "json/copy-sender.shape.txt") }
                // The full pass's progress, as JSON lines among the sender's messages on stderr.
                let events = r.stderr.split(separator: "\n").filter { $0.hasPrefix("{") && $0.contains("\"event\":\"progress\"") }
                #expect(events.last?.contains("\"percent\":100") == true && events.allSatisfy { $0.contains("\"step\":\"copying (full pass)\"") }, "\(r.stderr)")
            } else if mode == "tcp" {
                // Across a loopback TCP connection (no feedback channel: the sender waits 5 s at
                // its sync point, as the original does). The connecting side retries until the
                // listener is up (a fixed sleep lost that race on a loaded machine, and the
                // listener then waited for ever); the listener gives up after 120 s alone. The
                // receiver's status comes back through a file, not `wait`: the shell inherits a
                // blocked SIGCHLD from the test process, and dash's `wait` on a background job
                // that ends later then sleeps for ever.
                let bin = TestSupport.ploopBinary
                let port = 20000 + Int(getpid() % 20000)
                let status = s.dir.file("receiver.status")
                r = try TestSupport.run("/bin/sh", ["-c", """
                    ( timeout 120 socat -u TCP-LISTEN:\(port),bind=127.0.0.1,reuseaddr STDOUT | \(bin) copy -d \(copy); echo $? > \(status) ) &
                    \(bin) copy -s \(dev) -F '\(stop)' | socat -u STDIN TCP:127.0.0.1:\(port),retry=100,interval=0.1
                    sent=$?
                    n=0
                    while [ ! -s \(status) ] && [ $n -lt 1300 ]; do sleep 0.1; n=$((n + 1)); done
                    exit $(( sent | $(cat \(status) 2>/dev/null || echo 1) ))
                    """])
            } else {
                let fifo = s.dir.file("feedback")
                #expect(mkfifo(fifo, 0o600) == 0)
                let bin = TestSupport.ploopBinary
                r = try TestSupport.run("/bin/sh", ["-c", "\(bin) copy -s \(dev) -F '\(stop)' -f 5 5<\(fifo) | \(bin) copy -d \(copy) -f 6 6>\(fifo)"])
            }
            #expect(r.code == 0, "\(r)")
            if mode == "local" {
                let report = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
                let frozen = report["frozenSeconds"] as! Double
                #expect(frozen < 1.0, "frozen \(frozen) s")
            }
            // The writer is stopped: the source now is what it was at the freeze.
            #expect(try TestSupport.sh("sync").code == 0)
            let sourceSums = try Self.sums(mnt)
            #expect(sourceSums.contains("base"))
            // Gone before the file system is unmounted (a stopped dd still holds a file open).
            Self.end(writer)
            // Read-only: nothing to repair, CIF_Empty included.
            let check = try TestSupport.ploop("check", "-f", "-r", copy)
            #expect(check.code == 0 && check.stdout.contains("no problems found"), "\(check)")
            #expect(try !ImageInfo.read(path: copy).inUse)
            let dev2 = try s.mount([copy])
            #expect(try TestSupport.sh("e2fsck", "-fn", dev2).code <= 1)
            let mnt2 = try s.mountFS(dev2, "copy-mnt")
            #expect(try Self.sums(mnt2) == sourceSums)
            try s.umountFS(mnt2)
            try s.umount(dev2)
            try s.finishClean(image: img, device: dev, mount: mnt)
        } }
    }

    @Test func receiverRefusesAnExistingImage() throws {
        let dir = try ScratchDirectory()
        dir.write("img", [1, 2, 3])
        let r = try TestSupport.run("/bin/sh", ["-c", "printf '' | \(TestSupport.ploopBinary) copy -d \(dir.file("img"))"])
        #expect(r.code == 4)
        #expect(r.stderr.contains("already exists"))
        #expect(dir.read("img") == [1, 2, 3])
    }
}
