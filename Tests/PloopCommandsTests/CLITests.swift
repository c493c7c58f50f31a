import Foundation
import PloopCommands
import PloopFormat
import PloopImage
import PloopTestSupport
import Testing

/// The command line as a user meets it: usage, help, and every kind of bad input answered with a
/// one-line error, a non-zero exit, and every file byte-identical afterwards.
struct UsageTests {
    @Test func noArgumentsListsCommands() throws {
        let r = InProcess.ploop([])
        #expect(r.code == 38)
        for cmd in ["init", "merge", "grow", "check", "info"] { #expect(r.stderr.contains("  \(cmd) ")) }
    }

    /// A peer that goes away is EPIPE, never SIGPIPE: a disk command died by the signal when a
    /// device daemon it was asking about was killed. Here the peer is a reader that closes our
    /// output before 160 KB of it are written (more than a pipe holds).
    @Test(.enabled(if: TestSupport.which("bash") != nil, "bash is missing"))
    func aPeerThatGoesAwayDoesNotKillTheCommand() throws {
        let script = #""$0" --experimental-dump-help | (exec 0<&-; sleep 0.3); echo "${PIPESTATUS[0]}""#
        let r = try TestSupport.run(TestSupport.which("bash")!, ["-c", script, TestSupport.ploopBinary])
        let status = Int(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(status != nil && status != 128 + 13, "ploop ended with \(r.stdout) (141: killed by SIGPIPE)")
    }

    /// Asked for the kernel driver where it is not loaded: a clear error, nothing started.
    @Test(.enabled(if: !FileManager.default.fileExists(atPath: "/sys/module/ploop"), "the ploop module is loaded here"))
    func kernelBackendWithoutTheModule() throws {
        let dir = try ScratchDirectory()
        #expect(InProcess.ploop("init", "-s", "16m", dir.file("a.hdd")).code == 0)
        let before = dir.read("a.hdd")
        for args in [["list", "--backend", "kernel"], ["mount", "--backend", "kernel", dir.file("a.hdd")]] {
            let r = try TestSupport.ploop(args)
            #expect(r.code == 2, "\(r)")
            #expect(r.stderr.contains("ploop kernel module is not loaded") && r.stderr.contains("--backend simulator"), "\(r)")
        }
        #expect(dir.read("a.hdd") == before)
    }

    @Test(arguments: ["init", "merge", "grow", "check", "info"])
    func commandAloneShowsItsUsage(_ cmd: String) throws {
        let r = InProcess.ploop([cmd])
        #expect(r.code == 38)
        #expect(r.stderr.contains("USAGE: ploop \(cmd)"))
    }

    @Test(arguments: ["init", "merge", "grow", "check", "info"])
    func helpHasAnExample(_ cmd: String) throws {
        let r = InProcess.ploop(cmd, "--help")
        #expect(r.code == 0)
        #expect(r.stdout.contains("Example"))
        #expect(r.stdout.contains("ploop \(cmd) "))
    }
}

struct InitCommandTests {
    @Test func createsWhatItSays() throws {
        let dir = try ScratchDirectory()
        let r = InProcess.ploop("init", "-s", "64m", "-b", "128", "-v", "1", dir.file("a.hdd"))
        #expect(r.code == 0, "\(r)")
        let info = try ImageInfo.read(path: dir.file("a.hdd"))
        #expect(info.format == .ploop1 && info.version == 1)
        #expect(info.virtualSize == 64 << 20)
        #expect(info.clusterSize == 64 << 10)
        #expect(info.fileSize == 64 << 10)
        #expect(info.flags == ["empty"])
    }

    @Test func rawImage() throws {
        let dir = try ScratchDirectory()
        #expect(InProcess.ploop("init", "-f", "raw", "-s", "1000", dir.file("r")).code == 0)
        // Rounded up to a whole (default 1 MiB) cluster.
        #expect(try ImageInfo.read(path: dir.file("r")).fileSize == 1 << 20)
    }

    @Test func infoAndCheckJSON() throws {
        let dir = try ScratchDirectory()
        _ = InProcess.ploop("init", "-s", "1g", dir.file("a"))
        let info = InProcess.ploop("info", "--json", dir.file("a"))
        let obj = try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as! [String: Any]
        #expect(obj["virtualSize"] as? Int == 1 << 30)
        #expect(obj["clusterSize"] as? Int == 1 << 20)
        #expect(obj["cylinders"] as? Int == 2080)
        let check = InProcess.ploop("check", "-f", "--json", dir.file("a"))
        #expect(check.code == 0)
        let rep = try JSONSerialization.jsonObject(with: Data(check.stdout.utf8)) as! [String: Any]
        #expect(rep["status"] as? String == "ok")
    }
}

/// Bad input: a table of invocations over a directory of prepared files. Each must fail with a
/// short error and leave every file exactly as it was (and create none).
struct BadInputTests {
    struct Bad: Sendable, CustomTestStringConvertible {
        var args: [String]
        var expect: String
        var code: Int32
        var testDescription: String { args.joined(separator: " ") }
    }

    /// Files: good.hdd (ploop1 64 MiB, 1 MiB clusters, data in cluster 0), small.hdd (64 KiB
    /// clusters), raw.img, empty, trunc.hdd (first 40 bytes), cut.hdd (header only, BAT cut),
    /// garbage, dir/, dirty.hdd (in-use mark set).
    static func prepare() throws -> ScratchDirectory {
        let d = try ScratchDirectory("ploop-bad")
        for (name, args) in [
            ("good.hdd", ["-s", "64m"]), ("small.hdd", ["-s", "64m", "-b", "128"]), ("dirty.hdd", ["-s", "64m"]),
            ("other.hdd", ["-s", "64m"]),
        ] {
            let r = InProcess.ploop(["init", "--no-descriptor"] + args + [d.file(name)])
            precondition(r.code == 0, "\(r)")
        }
        let image = try Ploop1Image(file: try ImagePath.open(d.file("good.hdd"), write: true), writable: true)
        let data = [UInt8](repeating: 0x42, count: image.clusterBytes)
        try data.withUnsafeBytes { try image.write(cluster: ClusterIndex(0), data: $0) }
        try image.close()
        var dirty = d.read("dirty.hdd")
        dirty[44] = 0x59; dirty[45] = 0x6E; dirty[46] = 0x6F; dirty[47] = 0x74
        d.write("dirty.hdd", dirty)
        _ = InProcess.ploop("init", "--no-descriptor", "-f", "raw", "-s", "64m", d.file("raw.img"))
        d.write("empty", [])
        d.write("trunc.hdd", Array(d.read("good.hdd")[0..<40]))
        d.write("cut.hdd", Array(d.read("good.hdd")[0..<4096]))
        d.write("garbage", [UInt8](repeating: 0xAB, count: 100_000))
        try FileManager.default.createDirectory(atPath: d.file("dir"), withIntermediateDirectories: false)
        return d
    }

    static let cases: [Bad] = [
        Bad(args: ["init", "-s", "1g", "good.hdd"], expect: "already exists", code: 4),
        Bad(args: ["init", "-s", "1g", "dir"], expect: "already exists", code: 4),
        Bad(args: ["init", "-s", "0", "new.hdd"], expect: "zero", code: 38),
        Bad(args: ["init", "-s", "-5", "new.hdd"], expect: "size \"-5\" is negative", code: 38),
        Bad(args: ["init", "-s", "99999999999999999999", "new.hdd"], expect: "larger than the largest image", code: 38),
        Bad(args: ["init", "-s", "1000b", "new.hdd"], expect: "not a multiple of 512", code: 38),
        Bad(args: ["init", "-s", "12q", "new.hdd"], expect: "unknown unit", code: 38),
        Bad(args: ["init", "-s", "1g", "-b", "100", "new.hdd"], expect: "power of two", code: 38),
        Bad(args: ["init", "-s", "1g", "-v", "3", "new.hdd"], expect: "-v 3: the header version is 1 or 2", code: 38),
        Bad(args: ["init", "-s", "3t", "-v", "1", "new.hdd"], expect: "v1 format limit", code: 38),
        Bad(args: ["init", "-s", "60t", "new.hdd"], expect: "50 TiB", code: 38),
        Bad(args: ["init", "-s", "1g", "nodir/new.hdd"], expect: "the folder nodir does not exist", code: 4),
        Bad(args: ["merge", "missing.hdd", "good.hdd"], expect: "no such file", code: 4),
        Bad(args: ["merge", "raw.img", "good.hdd"], expect: "not a ploop1 image", code: 11),
        Bad(args: ["merge", "small.hdd", "good.hdd"], expect: "clusters", code: 11),
        Bad(args: ["merge", "good.hdd", "good.hdd"], expect: "same file", code: 38),
        Bad(args: ["merge", "good.hdd", "other.hdd", "good.hdd"], expect: "same file", code: 38),
        Bad(args: ["merge", "good.hdd", "missing.hdd"], expect: "no such file", code: 4),
        Bad(args: ["merge", "-f", "raw", "good.hdd", "other.hdd"], expect: "-f ploop1", code: 38),
        Bad(args: ["merge", "good.hdd", "raw.img"], expect: "not a ploop1 image", code: 11),
        Bad(args: ["merge", "empty", "other.hdd"], expect: "not a ploop1 image", code: 11),
        Bad(args: ["merge", "trunc.hdd", "other.hdd"], expect: "truncated", code: 11),
        Bad(args: ["merge", "cut.hdd", "other.hdd"], expect: "truncated", code: 11),
        Bad(args: ["merge", "dirty.hdd", "other.hdd"], expect: "marked in use", code: 37),
        Bad(args: ["merge", "dir", "other.hdd"], expect: "is a directory", code: 4),
        Bad(args: ["merge", "good.hdd"], expect: "at least one source", code: 38),
        Bad(args: ["grow", "-s", "1m", "good.hdd"], expect: "cannot shrink", code: 38),
        Bad(args: ["grow", "-s", "1g", "missing.hdd"], expect: "no such file", code: 4),
        Bad(args: ["grow", "-s", "1g", "dir"], expect: "is a directory", code: 4),
        Bad(args: ["grow", "-s", "1g", "-f", "raw", "good.hdd"], expect: "-f ploop1", code: 38),
        Bad(args: ["grow", "-s", "1g", "garbage"], expect: "-f raw", code: 11),
        Bad(args: ["grow", "-s", "1k", "-f", "raw", "raw.img"], expect: "cannot shrink", code: 38),
        Bad(args: ["grow", "-s", "1g", "dirty.hdd"], expect: "marked in use", code: 37),
        Bad(args: ["grow", "-s", "1g", "cut.hdd"], expect: "truncated", code: 11),
        Bad(args: ["grow", "-s", "0", "good.hdd"], expect: "zero", code: 38),
        Bad(args: ["check", "-f", "-r", "empty"], expect: "truncated", code: 11),
        Bad(args: ["check", "-f", "-r", "trunc.hdd"], expect: "truncated", code: 11),
        Bad(args: ["check", "-r", "-f", "garbage"], expect: "wrong signature", code: 11),
        Bad(args: ["check", "-f", "-r", "cut.hdd"], expect: "inside the header/BAT", code: 11),
        Bad(args: ["check", "-f", "missing.hdd"], expect: "no such file", code: 4),
        Bad(args: ["check", "-f", "dir"], expect: "is a directory", code: 4),
        Bad(args: ["check", "-r", "dirty.hdd"], expect: "dirty flag", code: 37),
        Bad(args: ["check", "-R", "raw.img"], expect: "-b SECTORS", code: 38),
        Bad(args: ["info", "missing.hdd"], expect: "no such file", code: 4),
        Bad(args: ["info", "dir"], expect: "is a directory", code: 4),
        Bad(args: ["info", "cut.hdd"], expect: "truncated", code: 11),
        Bad(args: ["info", "empty"], expect: "empty", code: 11),
    ]

    @Test(arguments: cases)
    func failsCleanly(_ bad: Bad) throws {
        let dir = try Self.prepare()
        let before = try dir.snapshot()
        let r = try TestSupport.ploop(bad.args, cwd: dir.path)
        #expect(r.code == bad.code, "expected exit \(bad.code): \(r)")
        let text = r.stdout + r.stderr
        #expect(text.contains(bad.expect), "\(r)")
        // The error itself is one line ("ploop: …" or the parser's "Error: …").
        let lines = r.stderr.split(separator: "\n")
        #expect(lines.count == 1 && lines[0].hasPrefix("ploop: ") || r.stdout.contains(bad.expect), "\(r)")
        #expect(try dir.snapshot() == before, "files changed")
    }

    @Test func lockedImageIsRefused() throws {
        let dir = try Self.prepare()
        let holder = try ImagePath.open(dir.file("good.hdd"), write: false)
        try ImagePath.lock(holder, exclusive: true)
        let before = try dir.snapshot()
        for args in [["check", "-f", "good.hdd"], ["merge", "other.hdd", "good.hdd"], ["grow", "-s", "1g", "good.hdd"], ["merge", "good.hdd", "other.hdd"]] {
            let r = try TestSupport.ploop(args, cwd: dir.path)
            #expect(r.code == ExitCodes.lock, "\(args): \(r)")
            #expect(r.stderr.contains("in use by another ploop process"), "\(args): \(r)")
        }
        #expect(try dir.snapshot() == before)
    }
}
