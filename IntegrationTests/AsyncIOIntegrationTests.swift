import Foundation
import PloopSystem
import PloopTestSupport
import Synchronization
import Testing

/// The simulator's daemon submits reads and writes of aligned image blocks with Linux AIO and
/// answers them from a completion thread. fio keeps 32 random 4 KiB writes in flight on a disk's
/// `/dev/ploopN` (crc32c in every block, each loop verified by reading everything back) while the
/// disk takes two online snapshots and a snapshot-merge: stack changes that must wait for the I/O
/// in flight. fio finds every block it wrote, the images check clean, and the daemon's log says
/// how many requests took the asynchronous path: many by default, none with
/// `PLOOP_FUSE_ASYNC=0` (so the count can fail).
@Suite(.serialized, .enabled(if: TestSupport.simulatorUnavailable == nil && TestSupport.which("fio") != nil,
                             "needs the simulator stack and fio: \(TestSupport.simulatorUnavailable ?? "fio is missing")"))
struct AsyncIOIntegrationTests {
    /// The count of asynchronous requests in the last "so far" line of a daemon log.
    static func servedAsynchronously(_ log: String) -> Int? {
        let lines = log.split(separator: "\n").filter { $0.contains("reads and writes so far:") }
        guard let last = lines.last, let r = last.range(of: "so far: ") else { return nil }
        return Int(last[r.upperBound...].prefix { $0.isNumber })
    }

    final class Outcome: Sendable {
        let result = Mutex<TestSupport.Result?>(nil)
    }

    @Test(arguments: [true, false])
    func acknowledgedWritesSurviveStackChangesWithRequestsInFlight(_ async: Bool) throws {
        try DeviceTestLock.run {
            let fio = try #require(TestSupport.which("fio"))
            let dir = try ScratchDirectory("ploop-aio")
            let disk = dir.file("disk")
            try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: false)
            #expect(try TestSupport.ploop("init", "-s", "128m", disk + "/root.hds").code == 0)
            let env = async ? [:] : ["PLOOP_FUSE_ASYNC": "0"]
            let m = try TestSupport.run(TestSupport.ploopBinary, ["mount", disk], environment: env)
            try #require(m.code == 0, "\(m)")
            let dev = m.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            var mounted = true
            defer { if mounted { _ = try? TestSupport.ploop("umount", "-d", dev) } }
            let log = "/run/ploop/\(dev.dropFirst("/dev/".count))/daemon.log"

            // The first 64 MiB written once (allocation: the synchronous path), so the random
            // writes below meet clusters the top holds (the asynchronous path) and clusters it
            // does not (the upper 32 MiB, and every cluster again after each snapshot).
            let fill = try TestSupport.run(fio, ["--name=fill", "--filename=\(dev)", "--rw=write", "--bs=1m", "--size=64m",
                                                 "--direct=1", "--ioengine=libaio", "--iodepth=8"], cwd: dir.path)
            #expect(fill.code == 0, "\(fill)")
            let job = ["--name=aio", "--filename=\(dev)", "--rw=randwrite", "--bs=4k", "--size=96m", "--direct=1",
                       "--ioengine=libaio", "--iodepth=32", "--loops=4", "--verify=crc32c", "--verify_fatal=1",
                       "--randseed=77"]
            let outcome = Outcome()
            let cwd = dir.path
            let writer = Thread {
                let r = try? TestSupport.run(fio, job, cwd: cwd)
                outcome.result.withLock { $0 = r }
            }
            writer.start()
            var commands: [String] = []
            for (pause, command) in [(300_000, ["snapshot", disk]), (400_000, ["snapshot", disk]), (400_000, ["snapshot-merge", disk])] as [(UInt32, [String])] {
                usleep(pause)
                let r = try TestSupport.ploop(command)
                #expect(r.code == 0, "\(command): \(r)")
                commands.append("\(command[0]) \(r.code)")
            }
            var ran: TestSupport.Result?
            for _ in 0..<1200 {
                ran = outcome.result.withLock { $0 }
                if ran != nil { break }
                usleep(100_000)
            }
            let r = try #require(ran, "fio did not end in 120 s")
            #expect(r.code == 0 && !(r.stdout + r.stderr).contains("verify: bad"), "fio with \(commands): \(r)")
            // One more snapshot, for the count of everything fio did.
            #expect(try TestSupport.ploop("snapshot", disk).code == 0)
            let said = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            let served = try #require(Self.servedAsynchronously(said), "no count in the daemon's log: \(said)")
            print("async \(async): \(served) requests served asynchronously")
            if async {
                #expect(said.contains("requests: asynchronous (Linux AIO)"), "\(said)")
                #expect(served > 50_000, "only \(served) requests took the asynchronous path: \(said)")
            } else {
                #expect(said.contains("requests: synchronous"), "\(said)")
                #expect(served == 0, "\(served) requests took the asynchronous path with PLOOP_FUSE_ASYNC=0")
            }
            #expect(try TestSupport.ploop("umount", disk).code == 0)
            mounted = false
            let check = try TestSupport.ploop("check", disk + "/DiskDescriptor.xml")
            #expect(check.code == 0, "\(check)")
        }
    }

    /// With the daemon's change recorder on (the power-cut tests), every guest write must reach
    /// the record, so none is submitted behind `File`'s back: rewrites of held clusters, which
    /// would go asynchronously, are served synchronously and recorded.
    @Test func recordedDaemonsServeEverythingSynchronously() throws {
        try DeviceTestLock.run {
            let dir = try ScratchDirectory("ploop-aio")
            let image = dir.file("root.hds")
            let record = dir.file("changes.log")
            #expect(try TestSupport.ploop("init", "--no-descriptor", "-s", "16m", image).code == 0)
            let m = try TestSupport.run(TestSupport.ploopBinary, ["mount", image], environment: ["PLOOP_TEST_DAEMON_RECORD": record])
            try #require(m.code == 0, "\(m)")
            let dev = m.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            var mounted = true
            defer { if mounted { _ = try? TestSupport.ploop("umount", "-d", dev) } }
            for pass in 0..<2 {
                let dd = try TestSupport.sh("dd", "if=/dev/urandom", "of=\(dev)", "bs=4k", "count=256", "oflag=direct", "status=none")
                #expect(dd.code == 0, "pass \(pass): \(dd)")
            }
            let recorded = (try? FileManager.default.attributesOfItem(atPath: record)[.size] as? Int) ?? 0
            // 1 MiB written twice: an unrecorded second pass would leave about 1 MiB.
            #expect(recorded > 3 << 19, "the record holds \(recorded) bytes after 2 MiB of guest writes")
            #expect(try TestSupport.ploop("umount", "-d", dev).code == 0)
            mounted = false
        }
    }
}
