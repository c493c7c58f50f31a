import Foundation
import PloopCommands
import PloopFormat
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

/// The tool as a hostile user meets it (issue 12): corrupted images, special files, abused
/// arguments, hostile copy streams and device names that are not ours. Every case runs the real
/// binary under a 3 GiB address-space limit and must end without a trap; a refusal is one line on
/// stderr with a non-zero exit and every file exactly as it was; an operation that goes through
/// on an image that checked clean leaves an image that still checks clean.
struct HostileInputTests {
    // MARK: - What the directory holds, without ever opening a FIFO or a device

    /// Kind and content of every entry, from lstat: regular files by their bytes, links by their
    /// target, nodes by their numbers.
    static func snapshot(_ dir: String) -> [String: String] {
        var out: [String: String] = [:]
        for name in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] {
            let p = dir + "/" + name
            var st = stat()
            guard lstat(p, &st) == 0 else { continue }
            switch st.st_mode & S_IFMT {
            case S_IFREG:
                let data = FileManager.default.contents(atPath: p) ?? Data()
                out[name] = "file \(data.count) \(data.hashValue)"
            case S_IFLNK: out[name] = "link " + ((try? FileManager.default.destinationOfSymbolicLink(atPath: p)) ?? "?")
            case S_IFDIR: out[name] = "dir " + snapshot(p).sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
            default: out[name] = "node \(st.st_mode) \(st.st_rdev)"
            }
        }
        return out
    }

    /// The rules every case is held to.
    static func expectSane(
        _ r: TestSupport.Result, allowed: Set<Int32>, unchanged: Bool, before: [String: String], dir: String,
        _ label: String, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        #expect(r.signal == nil, "\(label): killed by signal: \(r)", sourceLocation: sourceLocation)
        #expect(allowed.contains(r.code), "\(label): exit \(r.code) not in \(allowed.sorted()): \(r)", sourceLocation: sourceLocation)
        if r.code != 0 && r.code != 11 && r.code != 17 && r.code != 37 {
            let lines = r.stderr.split(separator: "\n", omittingEmptySubsequences: true)
            #expect(lines.count == 1 && lines[0].hasPrefix("ploop"), "\(label): the error is not one line: \(r)", sourceLocation: sourceLocation)
        }
        if unchanged || r.code != 0 {
            #expect(snapshot(dir) == before, "\(label): files changed: \(r)", sourceLocation: sourceLocation)
        }
    }

    // MARK: - Corrupted headers: every field at 0, 1, max, random

    struct HeaderCase: Sendable, CustomTestStringConvertible {
        var version: FormatVersion
        var field: String
        var offset: Int
        var width: Int
        var value: String
        var testDescription: String { "v\(version.rawValue) \(field)=\(value)" }
    }

    static let fields: [(String, Int, Int)] = [
        ("signature", 0, 16), ("type", 16, 4), ("heads", 20, 4), ("cylinders", 24, 4), ("clusterSectors", 28, 4),
        ("batEntries", 32, 4), ("sizeInSectors", 36, 8), ("inUse", 44, 4), ("firstBlockOffset", 48, 4), ("flags", 52, 4),
        ("extensionOffset", 56, 8),
    ]

    static let headerCases: [HeaderCase] = FormatVersion.allCases.flatMap { v in
        fields.flatMap { f in ["0", "1", "max", "random"].map { HeaderCase(version: v, field: f.0, offset: f.1, width: f.2, value: $0) } }
    }

    static func bytes(for value: String, width: Int, seed: Int) -> [UInt8] {
        switch value {
        case "0": return [UInt8](repeating: 0, count: width)
        case "1": return [1] + [UInt8](repeating: 0, count: width - 1)
        case "max": return [UInt8](repeating: 0xFF, count: width)
        default:
            var x = XorShift(seed: UInt64(truncatingIfNeeded: seed) &* 0x9E37_79B9_7F4A_7C15)
            return x.bytes(width)
        }
    }

    /// A 16 MiB image of 32 KiB clusters with data in clusters 0, 1, 2.
    static func sample(_ dir: ScratchDirectory, _ name: String, version: FormatVersion = .v2, size: String = "16m") throws -> String {
        let p = dir.file(name)
        let r = try TestSupport.ploop("init", "--no-descriptor", "-s", size, "-b", "64", "-v", "\(version.rawValue)", p)
        precondition(r.code == 0, "\(r)")
        let image = try Ploop1Image(file: try ImagePath.open(p, write: true), writable: true)
        for c in 0..<3 {
            let data = [UInt8](repeating: UInt8(c + 1), count: image.clusterBytes)
            try data.withUnsafeBytes { try image.write(cluster: ClusterIndex(UInt64(c)), data: $0) }
        }
        try image.close()
        return p
    }

    static func poke(_ path: String, _ offset: UInt64, _ bytes: [UInt8]) throws {
        let f = try File(path: path, mode: .readWrite)
        try bytes.withUnsafeBytes { try f.write($0, at: offset) }
    }

    /// Runs the offline commands on `bad` (and a clean `other.hdd` beside it) and holds each to the rules.
    static func exercise(_ dir: ScratchDirectory, _ bad: String, label: String) throws {
        let name = (bad as NSString).lastPathComponent
        let cleanBefore = try TestSupport.ploopLimited(["check", "-f", "-r", name], cwd: dir.path).code == 0
        let readOnly: [([String], Set<Int32>)] = [
            (["info", name], [0, 11]),
            (["info", "--json", name], [0, 11]),
            (["check", "-f", "-r", name], [0, 11, 17, 37]),
            (["check", "-f", "-r", "-c", name], [0, 11, 17, 37]),
        ]
        for (args, allowed) in readOnly {
            let before = snapshot(dir.path)
            let r = try TestSupport.ploopLimited(args, cwd: dir.path)
            expectSane(r, allowed: allowed, unchanged: true, before: before, dir: dir.path, "\(label): \(args.joined(separator: " "))")
        }
        let mutating: [[String]] = [
            ["merge", name, "other.hdd"],
            ["merge", "other.hdd", name],
            ["merge", "-f", "raw", name, "raw.img"],
            ["grow", "-s", "1g", name],
        ]
        for args in mutating {
            // Each on fresh copies, so one command's success does not feed the next.
            let saved = snapshotBytes(dir)
            let before = snapshot(dir.path)
            let r = try TestSupport.ploopLimited(args, cwd: dir.path)
            expectSane(r, allowed: [0, 11], unchanged: false, before: before, dir: dir.path, "\(label): \(args.joined(separator: " "))")
            if r.code == 0 && cleanBefore {
                for target in [args.last!] where target != "raw.img" {
                    let after = try TestSupport.ploopLimited(["check", "-f", "-r", target], cwd: dir.path)
                    #expect(after.code == 0, "\(label): \(args.joined(separator: " ")) left \(target) not clean: \(after)")
                }
            }
            restore(dir, saved)
        }
        let repair = try TestSupport.ploopLimited(["check", "-f", name], cwd: dir.path)
        #expect(repair.signal == nil && [0, 1, 11, 17, 37].contains(repair.code), "\(label): check -f: \(repair)")
    }

    static func snapshotBytes(_ dir: ScratchDirectory) -> [String: Data] {
        var out: [String: Data] = [:]
        for name in (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? [] where PathInfo.entryKind(dir.file(name)) == .regular {
            out[name] = FileManager.default.contents(atPath: dir.file(name))
        }
        return out
    }

    static func restore(_ dir: ScratchDirectory, _ saved: [String: Data]) {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? [] where saved[name] == nil {
            PathInfo.removeRegularFile(dir.file(name))
        }
        for (name, data) in saved { _ = FileManager.default.createFile(atPath: dir.file(name), contents: data) }
    }

    static func stage() throws -> ScratchDirectory {
        let dir = try ScratchDirectory("ploop-hostile")
        _ = try sample(dir, "other.hdd")
        let r = try TestSupport.ploop("init", "--no-descriptor", "-f", "raw", "-s", "16m", dir.file("raw.img"))
        precondition(r.code == 0, "\(r)")
        return dir
    }

    @Test(arguments: headerCases)
    func corruptedHeaderField(_ c: HeaderCase) throws {
        let dir = try Self.stage()
        let bad = try Self.sample(dir, "bad.hdd", version: c.version)
        try Self.poke(bad, UInt64(c.offset), Self.bytes(for: c.value, width: c.width, seed: c.offset * 31 + c.version.rawValue))
        try Self.exercise(dir, bad, label: c.testDescription)
    }

    // MARK: - Corrupted BAT entries

    struct EntryCase: Sendable, CustomTestStringConvertible {
        var name: String
        var version: FormatVersion
        var slot: UInt64
        var value: UInt32
        var testDescription: String { "v\(version.rawValue) \(name)" }
    }

    /// On a 512 MiB image of 32 KiB clusters: a BAT of three clusters (blocks 0..2), data in
    /// clusters 0, 1, 2 at blocks 3, 4, 5.
    static let entryCases: [EntryCase] = FormatVersion.allCases.flatMap { v -> [EntryCase] in
        let unit: UInt32 = v == .v1 ? 64 : 1
        return [
            EntryCase(name: "entry into the header", version: v, slot: 7, value: 1 * unit),
            EntryCase(name: "entry into the BAT", version: v, slot: 7, value: 2 * unit),
            EntryCase(name: "entry past EOF", version: v, slot: 7, value: 1_000_000 * unit),
            EntryCase(name: "entry 0xffffffff", version: v, slot: 7, value: 0xFFFF_FFFF),
            EntryCase(name: "entry shared with cluster 1", version: v, slot: 7, value: 4 * unit),
            EntryCase(name: "slot past the virtual size", version: v, slot: 20_000, value: 3 * unit),
        ] + (v == .v1 ? [EntryCase(name: "misaligned entry", version: v, slot: 7, value: 65 * 3)] : [])
    }

    @Test(arguments: entryCases)
    func corruptedBATEntry(_ c: EntryCase) throws {
        let dir = try Self.stage()
        let bad = try Self.sample(dir, "bad.hdd", version: c.version, size: "512m")
        try Self.poke(bad, 64 + 4 * c.slot, withUnsafeBytes(of: c.value.littleEndian) { Array($0) })
        let before = Self.snapshot(dir.path)
        // Nothing that writes may trust this BAT.
        for args in [["merge", "bad.hdd", "other.hdd"], ["merge", "other.hdd", "bad.hdd"], ["merge", "-f", "raw", "bad.hdd", "raw.img"], ["grow", "-s", "8g", "bad.hdd"]] {
            let r = try TestSupport.ploopLimited(args, cwd: dir.path)
            Self.expectSane(r, allowed: [ExitCodes.format], unchanged: true, before: before, dir: dir.path, "\(c.testDescription): \(args.joined(separator: " "))")
            #expect(r.stderr.contains("bad.hdd is corrupt"), "\(c.testDescription): \(args): \(r)")
        }
        let check = try TestSupport.ploopLimited(["check", "-f", "-r", "bad.hdd"], cwd: dir.path)
        #expect(check.code == 11, "\(c.testDescription): \(check)")
        try Self.exercise(dir, bad, label: c.testDescription)
    }

    // MARK: - Truncations at every structure boundary

    static let cuts: [String] = ["0", "1", "63", "64", "65", "batEnd-1", "batEnd", "l1-1", "l1", "l1+half", "end-1"]

    @Test(arguments: FormatVersion.allCases.flatMap { v in cuts.map { (v.rawValue, $0) } })
    func truncatedImage(_ version: Int, _ cut: String) throws {
        let dir = try Self.stage()
        let bad = try Self.sample(dir, "bad.hdd", version: FormatVersion(rawValue: version)!, size: "512m")
        let cb: UInt64 = 32768
        let size = UInt64(try File(path: bad, mode: .readOnly).size())
        let batEnd = 64 + 4 * (512 << 20) / cb
        let l1 = 3 * cb
        let at: UInt64 = switch cut {
        case "batEnd-1": batEnd - 1
        case "batEnd": batEnd
        case "l1-1": l1 - 1
        case "l1": l1
        case "l1+half": l1 + cb / 2
        case "end-1": size - 1
        default: UInt64(cut)!
        }
        #expect(truncate(bad, off_t(at)) == 0)
        try Self.exercise(dir, bad, label: "v\(version) cut at \(cut) (\(at))")
    }

    // MARK: - Special files where images are expected

    static let specials = ["fifo", "directory", "symlink-loop", "dangling-symlink", "symlink-to-dir", "char-device"]

    @Test(arguments: specials)
    func specialFileAsImage(_ kind: String) throws {
        if kind == "char-device" && !TestSupport.isRoot { return }
        let dir = try Self.stage()
        let x = dir.file("x")
        switch kind {
        case "fifo": #expect(mkfifo(x, 0o600) == 0)
        case "directory": try FileManager.default.createDirectory(atPath: x, withIntermediateDirectories: false)
        case "symlink-loop":
            try FileManager.default.createSymbolicLink(atPath: x, withDestinationPath: "y")
            try FileManager.default.createSymbolicLink(atPath: dir.file("y"), withDestinationPath: "x")
        case "dangling-symlink": try FileManager.default.createSymbolicLink(atPath: x, withDestinationPath: "nowhere")
        case "symlink-to-dir": try FileManager.default.createSymbolicLink(atPath: x, withDestinationPath: "/tmp")
        default: #expect(try TestSupport.sh("mknod", x, "c", "1", "3").code == 0)
        }
        let stream = try ScratchDirectory("ploop-hostile-stream")
        _ = FileManager.default.createFile(atPath: stream.file("s"), contents: Data(CopyStreamBytes.valid()))
        let runs: [([String], String?)] = [
            (["info", "x"], nil), (["check", "-f", "x"], nil), (["check", "-f", "-r", "x"], nil),
            (["merge", "x", "other.hdd"], nil), (["merge", "other.hdd", "x"], nil), (["grow", "-s", "1g", "x"], nil),
            (["grow", "-f", "raw", "-s", "1g", "x"], nil), (["init", "-s", "1m", "x"], nil),
            (["copy", "-d", "x"], stream.file("s")), (["copy", "-d", "x", "--replace"], stream.file("s")),
        ]
        for (args, input) in runs {
            let before = Self.snapshot(dir.path)
            let r = try TestSupport.ploopLimited(args, cwd: dir.path, input: input)
            Self.expectSane(r, allowed: [ExitCodes.open], unchanged: true, before: before, dir: dir.path, "\(kind): \(args.joined(separator: " "))")
        }
    }

    // MARK: - Arguments at and past every limit

    static let argumentCases: [[String]] = {
        var out: [[String]] = []
        for s in ["51t", "\(PloopSpec.maxImageSectors + 1)", "18014398509481984", "18446744073709551615", "18446744073709551616",
            "99999999999999999999999", "-1", "-0", "1.5", "0", "0k", "abc", "1x", "", " ", "0x10", "1e9", "+5", "1 g", "9999999999t"]
        {
            out.append(["init", "-s", s, "new.hdd"])
            out.append(["grow", "-s", s, "other.hdd"])
            out.append(["grow", "-f", "raw", "-s", s, "raw.img"])
        }
        for b in ["0", "63", "65", "262144", "-64", "4294967296", "abc", "", "2048.0"] {
            out.append(["init", "-s", "1m", "-b", b, "new.hdd"])
            out.append(["check", "-R", "-b", b, "raw.img"])
        }
        for v in ["0", "3", "-1", "x", "", "2.0"] { out.append(["init", "-s", "1m", "-v", v, "new.hdd"]) }
        for l in ["-1", "-1..2", "a..b", "1..1", "2..1", "0...2", "1..2..3", "..2", "99999999999999999999", ".."] {
            out.append(["merge", "-d", "/dev/ploop0", "-l", l])
        }
        out += [
            ["init", "-s", "1m", "-f", "qcow2", "new.hdd"], ["init", "new.hdd"], ["init", "-s"], ["merge", "-l", "1", "a", "b"],
            ["mount", "-d", "/dev/vda", "other.hdd"], ["umount", "-d", "/dev/ploop0", "-m", "/"],
            ["check", "-R", "raw.img"], ["balloon", "change"], ["balloon", "nonsense"], ["nonsense"],
            ["grow", "-s", "1g"], ["grow", "-s", "1g", "-d", "/dev/ploop0", "other.hdd"],
        ]
        return out
    }()

    @Test(arguments: argumentCases)
    func abusedArguments(_ args: [String]) throws {
        let dir = try Self.stage()
        let before = Self.snapshot(dir.path)
        let r = try TestSupport.ploopLimited(args, cwd: dir.path)
        Self.expectSane(r, allowed: [ExitCodes.param], unchanged: true, before: before, dir: dir.path, args.joined(separator: " "))
    }

    @Test(arguments: [["copy", "-d", "out", "-f", "99"], ["copy", "-d", "out", "-i", "99"], ["copy", "-d", "out", "-i", "-3"]])
    func descriptorsThatAreNotOpen(_ args: [String]) throws {
        let dir = try Self.stage()
        let before = Self.snapshot(dir.path)
        let r = try TestSupport.ploopLimited(args, cwd: dir.path)
        Self.expectSane(r, allowed: [ExitCodes.param], unchanged: true, before: before, dir: dir.path, args.joined(separator: " "))
        #expect(r.stderr.contains("99 is not open") || r.stderr.contains("-3 is not open"), "\(r)")
    }

    // MARK: - Hostile copy streams

    static let streams: [(String, [UInt8])] = {
        func h(_ marker: UInt32, _ size: UInt32, _ pos: UInt64) -> [UInt8] {
            withUnsafeBytes(of: marker.littleEndian) { Array($0) } + withUnsafeBytes(of: size.littleEndian) { Array($0) }
                + withUnsafeBytes(of: pos.littleEndian) { Array($0) }
        }
        let m: UInt32 = 0x4cc0_ac3d
        let valid = CopyStreamBytes.valid()
        var x = XorShift(seed: 0x1234_5678)
        let random = x.bytes(10_000)
        return [
            ("empty", []),
            ("random bytes", random),
            ("bad marker", h(0xdead_beef, 16, 0) + [UInt8](repeating: 1, count: 16) + h(m, 0, 0)),
            ("record of 4 GiB", h(m, 0xFFFF_FFFF, 0)),
            ("record at 2^63", h(m, 512, 1 << 63) + [UInt8](repeating: 1, count: 512) + h(m, 0, 0)),
            ("record wrapping past 2^64", h(m, 512, UInt64.max - 100) + [UInt8](repeating: 1, count: 512) + h(m, 0, 0)),
            ("cut in a header", Array(valid.prefix(10))),
            ("cut in a payload", Array(valid.prefix(16 + 100))),
            ("no end record", Array(valid.dropLast(16))),
            ("sync then nothing", h(m, 4, 0) + [0, 0, 0, 0]),
        ]
    }()

    @Test(arguments: streams.indices)
    func hostileCopyStream(_ i: Int) throws {
        let (name, bytes) = Self.streams[i]
        let dir = try Self.stage()
        let input = try ScratchDirectory("ploop-hostile-stream")
        _ = FileManager.default.createFile(atPath: input.file("s"), contents: Data(bytes))
        let before = Self.snapshot(dir.path)
        let r = try TestSupport.ploopLimited(["copy", "-d", "out"], cwd: dir.path, input: input.file("s"))
        Self.expectSane(r, allowed: [ExitCodes.protocolError], unchanged: true, before: before, dir: dir.path, "stream \(name)")
    }

    // MARK: - Device names that are not ours

    static let deviceCases: [[String]] = [
        ["umount", "-d", "/dev/vda"], ["umount", "-d", "/dev/sda1"], ["umount", "-d", "/dev/ploop99999"], ["umount", "-d", "ploop"],
        ["umount", "-d", "/dev/ploop-1"], ["umount", "-d", "/dev/ploop+1"], ["umount", "-m", "/"], ["umount", "-m", "/proc"],
        ["snapshot", "-d", "/dev/vda", "new.hdd"], ["merge", "-d", "/dev/sda"], ["grow", "-s", "1g", "-d", "/dev/vda"],
        ["balloon", "show", "-d", "/dev/vda"], ["balloon", "change", "-s", "1m", "-d", "/dev/vda"], ["copy", "-s", "/dev/vda", "-d", "out"],
        ["mount", "-d", "/dev/loop0", "other.hdd"], ["snapshot", "-d", "/dev/ploop65000", "new.hdd"],
    ]

    @Test(arguments: deviceCases)
    func deviceNamesThatAreNotOurs(_ args: [String]) throws {
        // Serialised with the tests that mount things, so /proc/mounts only changes if we did it.
        try DeviceTestLock.run { try Self.refusesDevice(args) }
    }

    static func refusesDevice(_ args: [String]) throws {
        let dir = try stage()
        let mountsBefore = try String(contentsOfFile: "/proc/mounts", encoding: .utf8)
        let before = snapshot(dir.path)
        let r = try TestSupport.ploopLimited(args, cwd: dir.path)
        // Not a ploop device name (38), or no such ploop device (2).
        expectSane(r, allowed: [ExitCodes.device, ExitCodes.param], unchanged: true, before: before, dir: dir.path, args.joined(separator: " "))
        #expect(try String(contentsOfFile: "/proc/mounts", encoding: .utf8) == mountsBefore, "\(args): mounts changed")
    }
}
