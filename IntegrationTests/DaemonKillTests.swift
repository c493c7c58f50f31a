import Foundation
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

/// fio writes through a running disk's `/dev/ploopN` with `--verify=crc32c` and O_SYNC (each write
/// returns once it is flushed, so what fio counts as done is what the disk acknowledged), and at a
/// random moment (seeded) the device's daemon, or the `ploop` command doing maintenance, is killed
/// with SIGKILL: under plain load, during an online snapshot, snapshot-merge and grow. After each
/// round the disk is unmounted (a dead device cleaned up, an interrupted command's journal
/// finished) and mounted again, and fio's verify-only pass reads back every block every round so
/// far acknowledged. At the end the disk checks clean, and a damaged region makes the verify fail
/// (the check can fail).
@Suite(.serialized, .enabled(if: TestSupport.simulatorUnavailable == nil && TestSupport.which("fio") != nil,
                             "needs the simulator stack and fio: \(TestSupport.simulatorUnavailable ?? "fio is missing")"))
struct DaemonKillTests {
    enum Operation: String, CaseIterable { case load, snapshot, snapshotMerge = "snapshot-merge", grow }
    enum Victim: String { case daemon, command }

    struct Round: CustomStringConvertible {
        var operation: Operation
        var victim: Victim
        var index: Int
        var job: String { "r\(index)" }
        /// Each round writes its own 24 MiB region.
        var offset: String { "\(16 + 24 * index)m" }
        var description: String { "round \(index): \(victim) killed during \(operation.rawValue)" }
    }

    static let rounds: [Round] = {
        var r: [Round] = []
        for op in Operation.allCases { r.append(Round(operation: op, victim: .daemon, index: r.count)) }
        for op in Operation.allCases where op != .load { r.append(Round(operation: op, victim: .command, index: r.count)) }
        return r
    }()

    /// fio's arguments for a round's region: the write pass (its state saved when it ends, killed or
    /// not) or the verify-only pass (that state loaded: only what the writes completed is read).
    static func fio(_ r: Round, device: String, verify: Bool) -> [String] {
        var a = ["--name=\(r.job)", "--filename=\(device)", "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=psync",
                 "--offset=\(r.offset)", "--size=24m", "--verify=crc32c", "--randseed=\(1000 + r.index)"]
        if verify {
            a += ["--verify_only=1", "--verify_state_load=1", "--verify_state_save=0"]
        } else {
            // Ended by an I/O error (the daemon killed) or by SIGINT: either way fio saves how
            // far its writes got.
            a += ["--sync=1", "--do_verify=0", "--verify_state_save=1", "--time_based", "--runtime=120"]
        }
        return a
    }

    final class Stage: @unchecked Sendable {
        let dir: ScratchDirectory
        let disk: String
        /// The device the disk runs on now, and every one it ran on (cleaned up by exact name).
        var device: String? { didSet { if let device { used.insert(device) } } }
        var used: Set<String> = []
        var started: [Int32] = []
        init() throws {
            dir = try ScratchDirectory("ploop-kill")
            disk = dir.file("disk")
            try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: false)
        }
        deinit {
            // Only what we started, by PID; then our disk, by its exact name.
            for pid in started where Spawn.reapIfEnded(pid) == nil {
                kill(pid, SIGKILL)
                _ = try? Spawn.wait(pid)
            }
            if device != nil { _ = try? TestSupport.ploop("umount", disk) }
            let listed = (try? TestSupport.ploop("list"))?.stdout ?? ""
            for d in used.sorted() where listed.contains(d + " ") { _ = try? TestSupport.ploop("umount", "-d", d) }
        }

        func start(_ executable: String, _ args: [String]) throws -> Int32 {
            let pid = try Spawn.start(executable, arguments: [executable] + args, environment: ProcessInfo.processInfo.environment,
                                      descriptors: [(0, .null), (1, .append(dir.file("out.log"))), (2, .descriptor(1))], directory: dir.path)
            started.append(pid)
            return pid
        }

        func wait(_ pid: Int32) throws -> Spawn.Termination {
            let t = try Spawn.wait(pid)
            started.removeAll { $0 == pid }
            return t
        }

        func daemonPID() throws -> Int32 {
            let n = Int(device!.dropFirst("/dev/ploop".count))!
            let data = try Data(contentsOf: URL(fileURLWithPath: "/run/ploop/ploop\(n)/state.json"))
            let state = try JSONSerialization.jsonObject(with: data) as? [String: Any]
            return Int32(try #require(state?["pid"] as? Int))
        }

        func verify(_ r: Round, _ at: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let v = try TestSupport.run(TestSupport.which("fio")!, DaemonKillTests.fio(r, device: device!, verify: true), cwd: dir.path)
            #expect(v.code == 0 && !(v.stdout + v.stderr).contains("verify: bad"), "\(at): verify of \(r): \(v)", sourceLocation: sourceLocation)
        }
    }

    @Test func fioVerifiesEveryAcknowledgedWriteThroughKills() throws {
        try DeviceTestLock.run {
            let s = try Stage()
            let seed = UInt64(ProcessInfo.processInfo.environment["PLOOP_KILL_SEED"] ?? "") ?? 7
            var rng = seed
            func random(_ range: ClosedRange<Int>) -> Int { range.lowerBound + Int(CrashStates.next(&rng) % UInt64(range.count)) }
            #expect(try TestSupport.ploop("init", "-s", "256m", "-b", "256", s.disk + "/root.hds").code == 0)
            var size = 256
            let fio = try #require(TestSupport.which("fio"))
            for r in Self.rounds {
                let mounted = try TestSupport.ploop("mount", s.disk)
                try #require(mounted.code == 0, "\(r): mount: \(mounted)")
                s.device = mounted.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                let daemon = try s.daemonPID()
                let writer = try s.start(fio, Self.fio(r, device: s.device!, verify: false))
                usleep(UInt32(random(400...1200)) * 1000)
                var command: Int32?
                switch r.operation {
                case .load: break
                case .snapshot: command = try s.start(TestSupport.ploopBinary, ["snapshot", s.disk])
                case .snapshotMerge:
                    // Something to merge: a snapshot first, taken whole.
                    #expect(try TestSupport.ploop("snapshot", s.disk).code == 0, "\(r)")
                    usleep(200_000)
                    command = try s.start(TestSupport.ploopBinary, ["snapshot-merge", s.disk])
                case .grow:
                    size += 32
                    command = try s.start(TestSupport.ploopBinary, ["grow", "-s", "\(size)m", s.disk])
                }
                usleep(UInt32(random(0...150)) * 1000)
                switch r.victim {
                case .daemon: #expect(kill(daemon, SIGKILL) == 0, "\(r)")
                case .command: if let command { kill(command, SIGKILL) }
                }
                // fio ends by itself once its device is gone; else it is told to stop.
                var ended: Spawn.Termination?
                for _ in 0..<20 {
                    if let t = Spawn.reapIfEnded(writer) { ended = t; break }
                    usleep(50_000)
                }
                if ended == nil {
                    kill(writer, SIGINT)
                    ended = try Spawn.wait(writer)
                }
                s.started.removeAll { $0 == writer }
                let ran = command.map { (try? s.wait($0))?.status ?? -1 }
                print("\(r): fio \(ended!.status), command \(ran.map(String.init) ?? "none")")
                // Unmount: a dead device is cleaned up; an interrupted command's journal finished
                // or rolled back (umount does it first, or the next mount).
                let u = try TestSupport.ploop("umount", s.disk)
                #expect(u.code == 0, "\(r): umount: \(u)")
                if u.code != 0, let d = s.device { _ = try TestSupport.ploop("umount", "-d", d) }
                s.device = nil
                let again = try TestSupport.ploop("mount", s.disk)
                try #require(again.code == 0, "\(r): mount again: \(again)")
                s.device = again.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                for done in Self.rounds[...r.index] { try s.verify(done, "after \(r)") }
                #expect(try TestSupport.ploop("umount", s.disk).code == 0, "\(r)")
                s.device = nil
                let check = try TestSupport.ploop("check", s.disk + "/DiskDescriptor.xml")
                #expect(check.code == 0, "\(r): check: \(check)")
                let journal = FileManager.default.fileExists(atPath: s.disk + "/DiskDescriptor.xml.journal")
                #expect(!journal, "\(r): a journal is left")
            }
            // The verify can fail: zeros over the first round's region.
            let m = try TestSupport.ploop("mount", s.disk)
            try #require(m.code == 0)
            s.device = m.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            let dd = try TestSupport.sh("dd", "if=/dev/zero", "of=\(s.device!)", "bs=1M", "seek=16", "count=24", "oflag=direct", "status=none")
            #expect(dd.code == 0, "\(dd)")
            let v = try TestSupport.run(fio, Self.fio(Self.rounds[0], device: s.device!, verify: true), cwd: s.dir.path)
            #expect(v.code != 0 && (v.stdout + v.stderr).contains("verify: bad"), "zeroed blocks passed the verify: \(v)")
            #expect(try TestSupport.ploop("umount", s.disk).code == 0)
            s.device = nil
            print("daemon kill rounds: \(Self.rounds.count), seed \(seed)")
        }
    }

    // MARK: - The daemon stopped or failed at each of its own steps

    enum Online: String, CaseIterable { case snapshot, snapshotMerge = "snapshot-merge", grow }

    static func arguments(_ op: Online, _ disk: String) -> [String] {
        switch op {
        case .snapshot: ["snapshot", disk]
        case .snapshotMerge: ["snapshot-merge", disk]
        case .grow: ["grow", "-s", "48m", disk]
        }
    }

    /// A disk with data in its base and in a snapshot above it (64 KiB clusters, 32 MiB), and what
    /// its device reads.
    static func stageDisk(_ s: Stage) throws -> (String, [UInt8]) {
        let staged = s.dir.file("staged")
        try FileManager.default.createDirectory(atPath: staged, withIntermediateDirectories: false)
        #expect(try TestSupport.ploop("init", "-s", "32m", "-b", "128", staged + "/root.hds").code == 0)
        let pattern = s.dir.file("pattern")
        try Data((0..<(64 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) }).write(to: URL(fileURLWithPath: pattern))
        for (round, clusters) in [[1, 2, 5, 9, 200], [2, 3, 9, 300, 301]].enumerated() {
            let m = try TestSupport.ploop("mount", staged)
            try #require(m.code == 0, "\(m)")
            let dev = m.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            for c in clusters {
                let dd = try TestSupport.sh("dd", "if=\(pattern)", "of=\(dev)", "bs=64k", "seek=\(c)", "count=1", "oflag=direct", "conv=notrunc", "status=none")
                #expect(dd.code == 0, "\(dd)")
            }
            #expect(try TestSupport.ploop("umount", staged).code == 0)
            if round == 0 { #expect(try TestSupport.ploop("snapshot", staged).code == 0) }
        }
        return (staged, try readDisk(staged, s))
    }

    /// What the disk's device reads (its first 32 MiB), mounted for the purpose.
    static func readDisk(_ disk: String, _ s: Stage) throws -> [UInt8] {
        let m = try TestSupport.ploop("mount", disk)
        try #require(m.code == 0, "mount: \(m)")
        s.device = m.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        defer {
            if (try? TestSupport.ploop("umount", disk))?.code == 0 { s.device = nil }
        }
        let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: s.device!))
        defer { try? h.close() }
        return Array(try h.read(upToCount: 32 << 20) ?? Data())
    }

    /// The disk mounts and reads `expected`, checks clean, and has no journal left.
    static func expectAsStaged(_ disk: String, _ expected: [UInt8], _ s: Stage, _ at: String) throws {
        let got = try readDisk(disk, s)
        if got != expected {
            let first = zip(got, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? min(got.count, expected.count)
            Issue.record("\(at): the disk reads other bytes from offset \(first) (\(got.count) bytes read)")
        }
        let check = try TestSupport.ploop("check", disk + "/DiskDescriptor.xml")
        #expect(check.code == 0, "\(at): check: \(check)")
        #expect(!FileManager.default.fileExists(atPath: disk + "/DiskDescriptor.xml.journal"), "\(at): a journal is left")
    }

    static func copyFolder(_ from: String, to: String) throws {
        try? FileManager.default.removeItem(atPath: to)
        #expect(try TestSupport.sh("cp", "-a", from, to).code == 0)
    }

    /// Whether a process runs (a zombie does not: nothing may reap a daemon whose parent exited).
    static func alive(_ pid: Int32) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return false }
        return !stat[close...].hasPrefix(") Z")
    }

    /// The steps of a daemon's life tried in turn: every one up to 80, then every fourth.
    static func steps() -> [Int] { Array(1...80) + Array(stride(from: 84, through: 600, by: 4)) }

    /// The daemon of a running disk ends (as if killed) at its Nth change, N = 1, 2 …, while it
    /// starts or while an online command works: the command fails or completes, `ploop umount`
    /// cleans up the dead device and finishes or undoes the command, the next mount reads what
    /// the disk read before, and the disk checks clean with no journal left.
    @Test(arguments: Online.allCases)
    func daemonEndedAtEachOfItsChangesLeavesADiskThatMountsAndReadsTheSame(_ op: Online) throws {
        try DeviceTestLock.run {
            let s = try Stage()
            let (staged, expected) = try Self.stageDisk(s)
            let run = s.disk
            var startup = 0, during = 0, tried = 0
            for n in Self.steps() {
                tried += 1
                try Self.copyFolder(staged, to: run)
                let at = "\(op.rawValue), daemon ended at its change \(n)"
                let m = try TestSupport.run(TestSupport.ploopBinary, ["mount", run], environment: ["PLOOP_TEST_DAEMON_CRASH_AT": "\(n)"])
                var completed = false
                if m.code != 0 {
                    startup += 1
                } else {
                    s.device = m.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                    let daemon = try s.daemonPID()
                    let r = try TestSupport.run(TestSupport.ploopBinary, Self.arguments(op, run))
                    // A daemon that died under the command may still be on its way out.
                    if r.code != 0 { for _ in 0..<40 where Self.alive(daemon) { usleep(50_000) } }
                    let alive = Self.alive(daemon)
                    completed = alive && r.code == 0
                    if !alive { during += 1 }
                    if alive && r.code != 0 { Issue.record("\(at): failed with the daemon alive: \(r)") }
                    let u = try TestSupport.ploop("umount", run)
                    #expect(u.code == 0, "\(at): umount: \(u)")
                    if u.code != 0, let d = s.device { _ = try TestSupport.ploop("umount", "-d", d) }
                    s.device = nil
                }
                try Self.expectAsStaged(run, expected, s, at)
                if completed { break }
            }
            print("daemon kills: \(op.rawValue): \(tried) steps tried, \(startup) while starting, \(during) during the command")
            #expect(during > 3, "the daemon never died during \(op.rawValue)")
        }
    }

    /// The daemon's Nth change fails with EIO or ENOSPC (alternately), N = 1, 2 …, while it
    /// starts or during an online command: a mount that fails leaves nothing; a command that
    /// fails says the errno; the device still reads what it read, `ploop umount` and the next
    /// mount work, the disk reads the same and checks clean with no journal left.
    @Test(arguments: Online.allCases)
    func daemonIOErrorAtEachOfItsChangesLeavesAWorkingDisk(_ op: Online) throws {
        try DeviceTestLock.run {
            let s = try Stage()
            let (staged, expected) = try Self.stageDisk(s)
            let run = s.disk
            var failedMount = 0, failedCommand = 0, lived = 0, tried = 0
            for n in Self.steps() {
                tried += 1
                try Self.copyFolder(staged, to: run)
                let errno = n % 2 == 1 ? "EIO" : "ENOSPC"
                let at = "\(op.rawValue), \(errno) at the daemon's change \(n)"
                // (What runs besides, ours or not, is left as it is.)
                let listed = try TestSupport.ploop("list").stdout
                let m = try TestSupport.run(TestSupport.ploopBinary, ["mount", run], environment: ["PLOOP_TEST_DAEMON_FAULT": "\(errno)@\(n)"])
                var reached = true
                if m.code != 0 {
                    failedMount += 1
                    let now = try TestSupport.ploop("list").stdout
                    #expect(now == listed, "\(at): a failed mount left a device: \(now)")
                } else {
                    s.device = m.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                    let r = try TestSupport.run(TestSupport.ploopBinary, Self.arguments(op, run))
                    let log = (try? String(contentsOfFile: "/run/ploop/\(s.device!.dropFirst("/dev/".count))/daemon.log", encoding: .utf8)) ?? ""
                    reached = log.contains("ploop-test: injected")
                    if r.code != 0 {
                        failedCommand += 1
                        let words = errno == "EIO" ? "Input/output error" : "No space left on device"
                        #expect(r.stderr.contains(words), "\(at): the message does not say the errno: \(r.stderr)")
                    } else if reached {
                        lived += 1
                    }
                    // The device still serves what the disk held.
                    let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: s.device!))
                    let now = Array(try h.read(upToCount: 32 << 20) ?? Data())
                    try? h.close()
                    #expect(now == expected, "\(at): the device reads other bytes after the failure")
                    let u = try TestSupport.ploop("umount", run)
                    #expect(u.code == 0, "\(at): umount: \(u)")
                    if u.code != 0, let d = s.device { _ = try TestSupport.ploop("umount", "-d", d) }
                    s.device = nil
                }
                try Self.expectAsStaged(run, expected, s, at)
                if !reached { break }
            }
            print("faults injected: daemon \(op.rawValue): \(tried) steps, \(failedMount) failed the mount, \(failedCommand) failed the command, \(lived) lived with")
            #expect(failedCommand > 2, "no fault failed \(op.rawValue)")
        }
    }

    /// A power cut of the whole host at any point of `mount`, an online command and `umount` of a
    /// disk: the commands' and the device daemon's changes in one log (`PLOOP_TEST_RECORD` and
    /// `PLOOP_TEST_DAEMON_RECORD` appending to one file), and FolderLog's states from it (unsynced
    /// data lost, kept or torn per file; unsynced names an ordered prefix). After each, no device
    /// runs (the host went down): the next mount finishes or undoes what the journal says, the
    /// disk reads every byte it read before, checks clean, and no journal is left.
    @Test(arguments: Online.allCases)
    func everyPowerCutStateOfAnOnlineCommandMountsAndReadsTheSame(_ op: Online) throws {
        try DeviceTestLock.run {
            let s = try Stage()
            let (staged, expected) = try Self.stageDisk(s)
            let run = s.disk
            try Self.copyFolder(staged, to: run)
            let initial = try FolderLog.snapshot(run)
            let log = s.dir.file("changes.log")
            let env = [ChangeRecorder.variable: log, "PLOOP_TEST_DAEMON_RECORD": log]
            let m = try TestSupport.run(TestSupport.ploopBinary, ["mount", run], environment: env)
            try #require(m.code == 0, "\(m)")
            s.device = m.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            let r = try TestSupport.run(TestSupport.ploopBinary, Self.arguments(op, run), environment: env)
            #expect(r.code == 0, "\(r)")
            let u = try TestSupport.run(TestSupport.ploopBinary, ["umount", run], environment: env)
            #expect(u.code == 0, "\(u)")
            s.device = nil
            let changes = FolderLog(Array(try Data(contentsOf: URL(fileURLWithPath: log))), folder: URL(fileURLWithPath: run).standardizedFileURL.path)
            #expect(changes.entries.count > 10, "the recorders saw \(changes.entries.count) changes")
            let states = changes.states(initial: initial, randomSubsets: CrashStates.subsets(1), cutsPerRun: 2)
            for state in states {
                try FolderLog.materialize(state.files, at: run)
                try Self.expectAsStaged(run, expected, s, "\(op.rawValue), a power cut (\(state.name))")
            }
            print("power-cut states: online \(op.rawValue) of a running disk, with mount and umount: \(states.count) from \(changes.entries.count) changes")
        }
    }
}
