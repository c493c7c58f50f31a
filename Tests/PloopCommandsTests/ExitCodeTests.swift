import Foundation
import PloopCommands
import PloopTestSupport
import Testing

/// The exit-code table: the original's numbers, printed by `--help` and README alike, and each
/// code a user can meet without a device reached by a real run that leaves every file as it was.
/// (Codes that need a running device or a file system, 3 17 20 21 22 24 26 29 33 41, are held
/// to their rows by the integration tests.)
struct ExitCodeTests {
    /// include/libploop.h of the original: the enum's values, written out.
    static let original: [String: Int32] = [
        "SYSEXIT_CREAT": 1, "SYSEXIT_DEVICE": 2, "SYSEXIT_DEVIOC": 3, "SYSEXIT_OPEN": 4, "SYSEXIT_PLOOPFMT": 11, "SYSEXIT_SYS": 12,
        "SYSEXIT_PROTOCOL": 13, "SYSEXIT_EBUSY": 17, "SYSEXIT_FALLOCATE": 20, "SYSEXIT_MOUNT": 21, "SYSEXIT_UMOUNT": 22,
        "SYSEXIT_LOCK": 23, "SYSEXIT_MKFS": 24, "SYSEXIT_RESIZE_FS": 26, "SYSEXIT_ABORT": 29, "SYSEXIT_CHANGE_GPT": 33,
        "SYSEXIT_PLOOPINUSE": 37, "SYSEXIT_PARAM": 38, "SYSEXIT_DISKDESCR": 39, "SYSEXIT_DEV_NOT_MOUNTED": 40, "SYSEXIT_FSCK": 41,
        "SYSEXIT_NOSNAP": 43,
    ]

    @Test func tableUsesTheOriginalNumbers() {
        #expect(ExitCodes.table.count == Set(ExitCodes.table.map(\.code)).count, "a code appears twice")
        for row in ExitCodes.table where !row.name.isEmpty {
            #expect(Self.original[row.name] == row.code, "\(row.name) is \(row.code) here, \(Self.original[row.name].map(String.init) ?? "absent") in the original")
        }
        #expect(ExitCodes.table.first?.code == 0)
    }

    @Test func helpAndReadmePrintEveryRow() throws {
        let help = InProcess.ploop("--help")
        #expect(help.code == 0)
        let readme = try String(contentsOfFile: TestSupport.packageRoot.appendingPathComponent("README.md").path, encoding: .utf8)
        for row in ExitCodes.table {
            let code = String(row.code)
            #expect(help.stdout.contains(String(repeating: " ", count: 4 - code.count) + code + "  " + row.meaning + "\n"), "--help lacks \(code)")
            #expect(readme.contains("| \(code) | \(row.name.isEmpty ? "—" : row.name) | \(row.meaning) |"), "README lacks \(code)")
        }
    }

    struct Case: Sendable, CustomTestStringConvertible {
        var code: Int32
        var args: [String]
        var expect: String
        var testDescription: String { "\(code): \(args.joined(separator: " "))" }
    }

    /// Run in a folder holding `disk/` (a disk of two images, snapshot g1 below the top), `a.hdd`
    /// (a plain image), `bad.hdd` (garbage) and `broken/` (a descriptor that is not XML).
    static let cases: [Case] = [
        Case(code: 0, args: ["info", "a.hdd"], expect: "ploop1"),
        Case(code: 2, args: ["umount", "-d", "/dev/ploop65000"], expect: "no ploop device /dev/ploop65000"),
        Case(code: 4, args: ["info", "missing.hdd"], expect: "no such file"),
        Case(code: 4, args: ["init", "-s", "1m", "a.hdd"], expect: "already exists"),
        Case(code: 11, args: ["check", "bad.hdd"], expect: "wrong signature"),
        Case(code: 11, args: ["merge", "bad.hdd", "a.hdd"], expect: "not a ploop1 image"),
        Case(code: 13, args: ["copy", "-d", "out", "-i", "3"], expect: "without its end record"),
        Case(code: 38, args: ["nonsense"], expect: "Unexpected argument"),
        Case(code: 38, args: ["init", "-s", "1x", "new.hdd"], expect: "unknown unit"),
        Case(code: 38, args: ["grow", "-s", "1m", "a.hdd"], expect: "cannot shrink"),
        Case(code: 38, args: ["--verbose", "x", "list"], expect: "--verbose x: the verbosity is a number"),
        Case(code: 38, args: ["--verbose"], expect: "--verbose needs a level"),
        Case(code: 38, args: ["-vx", "list"], expect: "-vx: the verbosity is a number"),
        Case(code: 39, args: ["snapshot-list", "broken"], expect: "is not a valid descriptor"),
        Case(code: 39, args: ["snapshot", "a.hdd"], expect: "no DiskDescriptor.xml there"),
        Case(code: 40, args: ["umount", "disk"], expect: "is not running on any device"),
        Case(code: 43, args: ["snapshot-delete", "-u", "{99999999-9999-4999-8999-999999999999}", "disk"], expect: "has no snapshot"),
        Case(code: 43, args: ["snapshot-switch", "-u", "{99999999-9999-4999-8999-999999999999}", "disk"], expect: "has no snapshot"),
        Case(code: 43, args: ["snapshot-list", "-u", "{99999999-9999-4999-8999-999999999999}", "disk"], expect: "has no snapshot"),
    ]

    static let g1 = "{11111111-1111-4111-8111-111111111111}"

    static func stage() throws -> ScratchDirectory {
        let dir = try ScratchDirectory("ploop-exit")
        try FileManager.default.createDirectory(atPath: dir.file("disk"), withIntermediateDirectories: false)
        try FileManager.default.createDirectory(atPath: dir.file("broken"), withIntermediateDirectories: false)
        for args in [["init", "-s", "16m", dir.file("disk/root.hds")], ["snapshot", "-u", g1, dir.file("disk")], ["init", "--no-descriptor", "-s", "16m", dir.file("a.hdd")]] {
            let r = InProcess.ploop(args)
            precondition(r.code == 0, "\(r)")
        }
        dir.write("bad.hdd", [UInt8](repeating: 0xAB, count: 100_000))
        dir.write("broken/DiskDescriptor.xml", Array("<Parallels_disk_image".utf8))
        // A copy stream cut short of its end record.
        dir.write("stream", Array(CopyStreamBytes.valid().dropLast(16)))
        return dir
    }

    @Test(arguments: cases)
    func eachCodeIsReached(_ c: Case) throws {
        let dir = try Self.stage()
        let before = try dir.snapshot()
        // Descriptor 3 is the cut stream (for copy -i 3).
        let r = try TestSupport.run("/bin/sh", ["-c", "cd \"$1\" && shift && exec 3<stream && exec \"$0\" \"$@\"", TestSupport.ploopBinary, dir.path] + c.args)
        #expect(r.code == c.code, "expected \(c.code): \(r)")
        #expect((r.stdout + r.stderr).contains(c.expect), "\(r)")
        // A refusal is one line on stderr; check reports what it found on stdout instead.
        if c.code != 0 && c.args[0] != "check" { #expect(r.stderr.hasPrefix("ploop: ") && r.stderr.split(separator: "\n").count == 1, "\(r)") }
        #expect(try dir.snapshot() == before, "files changed")
    }
}

/// `-q` and `-v N` before the command: what is printed, never what is done.
struct VerbosityTests {
    @Test func parsesTheOriginalForms() throws {
        let forms: [([String], Int)] = [
            ([], 3), (["-v"], 4), (["-vv"], 5), (["-vvv"], 6), (["-v", "0"], 0), (["-v4"], 4), (["-v", "-1"], -1),
            (["-q"], -1), (["--quiet"], -1), (["--verbose", "5"], 5), (["--verbose=2"], 2), (["-q", "-v"], 0),
        ]
        for (options, level) in forms {
            let (l, rest) = try Verbosity.take(options + ["list", "-v"])
            #expect(l == level, "\(options)")
            #expect(rest == ["list", "-v"], "\(options): a command's own -v is its own")
        }
    }

    @Test func quietPrintsOnlyDataAndErrors() throws {
        let dir = try ScratchDirectory("ploop-verbosity")
        let loud = InProcess.ploop("init", "--no-descriptor", "-s", "16m", dir.file("a.hdd"))
        #expect(loud.code == 0 && loud.stdout.contains("Created"), "\(loud)")
        let quiet = InProcess.ploop("-q", "init", "--no-descriptor", "-s", "16m", dir.file("b.hdd"))
        #expect(quiet.code == 0 && quiet.stdout.isEmpty && quiet.stderr.isEmpty, "\(quiet)")
        #expect(dir.read("a.hdd") == dir.read("b.hdd"), "-q changed what was made")
        // The data asked for is still printed, and errors too.
        let info = InProcess.ploop("-q", "info", "--json", dir.file("b.hdd"))
        #expect(info.code == 0 && info.stdout.contains("\"format\""), "\(info)")
        let missing = InProcess.ploop("-q", "info", dir.file("c.hdd"))
        #expect(missing.code == 4 && missing.stderr.contains("no such file"), "\(missing)")
    }

    @Test func debugLinesAtFour() throws {
        let dir = try ScratchDirectory("ploop-verbosity")
        _ = InProcess.ploop("init", "--no-descriptor", "-s", "16m", dir.file("a.hdd"))
        let plain = InProcess.ploop("info", dir.file("a.hdd"))
        #expect(plain.code == 0 && plain.stderr.isEmpty, "\(plain)")
        for options in [["-v", "4"], ["-v"], ["-vv"], ["--verbose=4"]] {
            let r = InProcess.ploop(options + ["info", dir.file("a.hdd")])
            #expect(r.code == 0 && r.stdout == plain.stdout, "\(options): \(r)")
            // A UTC timestamp, the level, and what ran.
            let lines = r.stderr.split(separator: "\n")
            #expect(lines.contains { $0.range(of: #"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z debug ploop: running info"#, options: .regularExpression) != nil }, "\(options): \(r)")
            #expect(lines.contains { $0.contains("debug ploop: exit 0") }, "\(options): \(r)")
        }
    }
}
