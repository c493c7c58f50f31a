import Foundation
import PloopFormat
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

@testable import PloopCommands

/// Images with known data, and the on-disk pokes that corrupt them.
enum Images {
    /// A ploop1 image `name` of `size` with cluster `c` filled with byte `c + 1` for each given cluster.
    @discardableResult
    static func make(_ dir: ScratchDirectory, _ name: String, size: String = "16m", blocksize: String = "64", clusters: [UInt64] = []) throws -> String {
        let path = dir.file(name)
        let r = try TestSupport.ploop("init", "--no-descriptor", "-s", size, "-b", blocksize, path)
        precondition(r.code == 0, "\(r)")
        guard !clusters.isEmpty else { return path }
        let image = try Ploop1Image(file: try ImagePath.open(path, write: true), writable: true)
        for c in clusters {
            let data = [UInt8](repeating: UInt8(truncatingIfNeeded: c + 1), count: image.clusterBytes)
            try data.withUnsafeBytes { try image.write(cluster: ClusterIndex(c), data: $0) }
        }
        try image.close()
        return path
    }

    /// Sets BAT entry `cluster` of the image at `path` to `value`.
    static func pokeEntry(_ path: String, _ cluster: UInt64, _ value: UInt32) throws {
        try poke32(path, 64 + 4 * cluster, value)
    }

    static func poke32(_ path: String, _ offset: UInt64, _ value: UInt32) throws {
        let f = try File(path: path, mode: .readWrite)
        let b = withUnsafeBytes(of: value.littleEndian) { Array($0) }
        try b.withUnsafeBytes { try f.write($0, at: offset) }
    }

    static func bytes(_ path: String) -> Data { FileManager.default.contents(atPath: path) ?? Data() }
}

/// Issue 12, defect by defect: each test fails on the code before the fix (run it with
/// PLOOP_TEST_BINARY pointing at an older build to see that).
struct SafetyRegressionTests {
    // MARK: 3. sizes that trapped

    @Test(arguments: [
        ["grow", "-f", "raw", "-s", "36028797018963968", "raw.img"],
        ["grow", "-f", "raw", "-s", "18014398509481984", "raw.img"],
        ["grow", "-s", "18014398509481984", "a.hdd"],
        ["init", "-s", "36028797018963968", "new.img"],
        ["balloon", "change", "-s", "36028797018963968", "-d", "/dev/ploop0"],
    ])
    func hugeSizesAreRefusedNotTrapped(_ args: [String]) throws {
        let dir = try ScratchDirectory()
        _ = try TestSupport.ploop("init", "--no-descriptor", "-f", "raw", "-s", "1m", dir.file("raw.img"))
        try Images.make(dir, "a.hdd")
        let before = try dir.snapshot()
        let r = try TestSupport.ploopLimited(args, cwd: dir.path)
        #expect(r.signal == nil, "\(r)")
        #expect(r.code == 38, "\(r)")
        #expect(r.stderr.contains("larger than the largest image ploop supports"), "\(r)")
        #expect(try dir.snapshot() == before)
    }

    // MARK: 2. copy --replace over what is not a regular file

    @Test(arguments: ["fifo", "symlink", "directory"])
    func copyReplacesOnlyRegularFiles(_ kind: String) throws {
        let dir = try ScratchDirectory()
        let target = dir.file("target")
        let victim = dir.file("victim")
        _ = FileManager.default.createFile(atPath: victim, contents: Data("keep me".utf8))
        switch kind {
        case "fifo": #expect(mkfifo(target, 0o600) == 0)
        case "symlink": try FileManager.default.createSymbolicLink(atPath: target, withDestinationPath: victim)
        default: try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: false)
        }
        // A whole, valid stream: one record and the end record.
        let stream = dir.file("stream")
        _ = FileManager.default.createFile(atPath: stream, contents: Data(CopyStreamBytes.valid()))
        let r = try TestSupport.ploopLimited(["copy", "-d", target, "--replace"], cwd: dir.path, input: stream)
        #expect(r.code == 4, "\(r)")
        #expect(r.stderr.contains("not a regular file: it is never replaced"), "\(r)")
        #expect(PathInfo.entryKind(target) == (kind == "fifo" ? .fifo : kind == "symlink" ? .symbolicLink : .directory))
        #expect(Images.bytes(victim) == Data("keep me".utf8))
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.contains(".part-") }.isEmpty)
    }

    @Test func copyReplacesARegularFileWhenAsked() throws {
        let dir = try ScratchDirectory()
        let target = dir.file("target")
        _ = FileManager.default.createFile(atPath: target, contents: Data("old".utf8))
        let stream = dir.file("stream")
        _ = FileManager.default.createFile(atPath: stream, contents: Data(CopyStreamBytes.valid()))
        let refused = try TestSupport.ploopLimited(["copy", "-d", target], cwd: dir.path, input: stream)
        #expect(refused.code == 4 && refused.stderr.contains("already exists"), "\(refused)")
        let r = try TestSupport.ploopLimited(["copy", "-d", target, "--replace"], cwd: dir.path, input: stream)
        #expect(r.code == 0, "\(r)")
        #expect(Images.bytes(target) == Data(CopyStreamBytes.payload))
    }

    // MARK: 4. the receiver and a gone sender

    @Test func receiverSurvivesAClosedFeedbackChannel() throws {
        let dir = try ScratchDirectory()
        let stream = dir.file("stream")
        _ = FileManager.default.createFile(atPath: stream, contents: Data(CopyStreamBytes.valid(sync: true)))
        // fd 3 is a pipe whose reader is gone before the receiver starts.
        let logs = try ScratchDirectory()
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        close(fds[0])
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, stream, O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, logs.file("err"), O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 3)
        let words: [String] = [TestSupport.ploopBinary, "copy", "-d", dir.file("out"), "-f", "3"]
        let argv: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        #expect(posix_spawn(&pid, TestSupport.ploopBinary, &actions, nil, argv, environ) == 0)
        close(fds[1])
        var status: Int32 = 0
        _ = waitpid(pid, &status, 0)
        let stderr = String(decoding: logs.read("err"), as: UTF8.self)
        // Exited (13, the protocol code) with a message, not killed by SIGPIPE.
        #expect(status & 0x7f == 0 && (status >> 8) & 0xff == 13, "status \(status): \(stderr)")
        #expect(stderr.contains("feedback channel") && stderr.contains("descriptor 3"), "\(stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir.file("out")))
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["stream"])
    }

    @Test func receiverNamesAClosedDescriptor() throws {
        let dir = try ScratchDirectory()
        let stream = dir.file("stream")
        _ = FileManager.default.createFile(atPath: stream, contents: Data(CopyStreamBytes.valid()))
        let r = try TestSupport.ploopLimited(["copy", "-d", dir.file("out"), "-f", "99"], cwd: dir.path, input: stream)
        #expect(r.code == 38, "\(r)")
        #expect(r.stderr.contains("feedback descriptor (-f) 99 is not open"), "\(r)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["stream"])
    }

    @Test func receiverErrorsNameTheDestination() throws {
        let dir = try ScratchDirectory()
        let stream = dir.file("stream")
        _ = FileManager.default.createFile(atPath: stream, contents: Data(CopyStreamBytes.valid().dropLast(16)))
        let r = try TestSupport.ploopLimited(["copy", "-d", dir.file("out")], cwd: dir.path, input: stream)
        #expect(r.code == 13 && r.stderr.contains("without its end record"), "\(r)")
        // A write that fails (a 512-byte file size limit, SIGXFSZ ignored: EFBIG) is told about
        // the destination the user named, not the temporary file.
        let full = try TestSupport.run("/bin/sh", ["-c", "trap '' XFSZ; ulimit -f 1; exec \"$0\" copy -d \"$1\" < \"$2\"", TestSupport.ploopBinary, dir.file("out"), stream])
        #expect(full.code == 12 && full.stderr.contains("writing \(dir.file("out")): File too large"), "\(full)")
        #expect(!full.stderr.contains(".part-"), "\(full)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["stream"])
    }

    @Test func interruptedReceiverRemovesItsPart() throws {
        let dir = try ScratchDirectory()
        let fifo = dir.file("in")
        #expect(mkfifo(fifo, 0o600) == 0)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: TestSupport.ploopBinary)
        p.arguments = ["copy", "-d", dir.file("out")]
        p.standardError = FileHandle.nullDevice
        // The FIFO open read-write (which does not wait for a peer) is its stdin, and we keep
        // writing to it: a stream that never ends.
        let pipe = try #require(FileHandle(forUpdatingAtPath: fifo))
        p.standardInput = pipe
        try p.run()
        pipe.write(Data(CopyStreamBytes.valid().prefix(16 + 4096)))
        var part: String?
        for _ in 0..<200 where part == nil {
            part = try FileManager.default.contentsOfDirectory(atPath: dir.path).first { $0.hasPrefix("out.part-") }
            if part == nil { usleep(20_000) }
        }
        #expect(part == "out.part-\(p.processIdentifier)")
        kill(p.processIdentifier, SIGTERM)
        var waited = 0
        while p.isRunning && waited < 250 { usleep(20_000); waited += 1 }
        #expect(!p.isRunning, "SIGTERM did not end the receiver (a signal mask it inherited?)")
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        #expect(p.terminationReason == .uncaughtSignal)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["in"])
    }

    /// A file this process locked and let go can be locked again at once, even while a copy of
    /// its descriptor lives on (as in a child another thread is spawning, until its exec): a
    /// delta `snapshot-merge -n` had just built was found "in use" by the merge that followed.
    @Test func aLockLetGoStaysGoneWhileACopyOfTheDescriptorLives() throws {
        let dir = try ScratchDirectory()
        let path = dir.file("image")
        _ = FileManager.default.createFile(atPath: path, contents: Data("image".utf8))
        var copy: Int32 = -1
        do {
            let first = try File(path: path, mode: .readWrite)
            #expect(try first.tryLock(.exclusive))
            copy = dup(first.fd)
            #expect(copy >= 0)
        }
        defer { close(copy) }
        let again = try File(path: path, mode: .readWrite)
        #expect(try again.tryLock(.exclusive), "the lock stayed with the copy of a closed descriptor")
    }

    @Test func deadReceiversPartIsRemovedAndALiveOnesIsNot() throws {
        let dir = try ScratchDirectory()
        let dead = dir.file("out.part-999999")
        let live = dir.file("out.part-999998")
        _ = FileManager.default.createFile(atPath: dead, contents: Data("stale".utf8))
        _ = FileManager.default.createFile(atPath: live, contents: Data("busy".utf8))
        let holder = try File(path: live, mode: .readWrite)
        #expect(try holder.tryLock(.exclusive))
        let stream = dir.file("stream")
        _ = FileManager.default.createFile(atPath: stream, contents: Data(CopyStreamBytes.valid()))
        let r = try TestSupport.ploopLimited(["copy", "-d", dir.file("out")], cwd: dir.path, input: stream)
        #expect(r.code == 0, "\(r)")
        #expect(r.stderr.contains("removed \(dead)"), "\(r)")
        #expect(!FileManager.default.fileExists(atPath: dead))
        #expect(Images.bytes(live) == Data("busy".utf8))
        #expect(Images.bytes(dir.file("out")) == Data(CopyStreamBytes.payload))
    }

    // MARK: 5. offline operations do not trust a corrupt BAT

    struct Corruption: Sendable, CustomTestStringConvertible {
        var name: String
        var cluster: UInt64
        var value: UInt32
        var testDescription: String { name }
    }

    /// On a 16 MiB image of 32 KiB clusters with data in clusters 0, 1 and 2 (blocks 1, 2, 3).
    static let corruptions = [
        Corruption(name: "two entries share a block", cluster: 5, value: 2),
        Corruption(name: "entry past the end of the file", cluster: 5, value: 3_000_000),
        Corruption(name: "entry 0xffffffff", cluster: 5, value: 0xFFFF_FFFF),
        Corruption(name: "entry into the header", cluster: 5, value: 0),
    ].filter { $0.value != 0 }

    @Test(arguments: corruptions)
    func mergeRefusesACorruptSource(_ c: Corruption) throws {
        for format in ["ploop1", "raw"] {
            let dir = try ScratchDirectory()
            let src = try Images.make(dir, "src.hdd", clusters: [0, 1, 2])
            try Images.pokeEntry(src, c.cluster, c.value)
            if format == "raw" {
                _ = try TestSupport.ploop("init", "--no-descriptor", "-f", "raw", "-s", "16m", dir.file("dst"))
            } else {
                try Images.make(dir, "dst")
            }
            let before = try dir.snapshot()
            let r = try TestSupport.ploopLimited(["merge", "-f", format, src, dir.file("dst")])
            #expect(r.code == 11, "\(format): \(r)")
            #expect(r.stderr.contains("src.hdd is corrupt") && r.stderr.contains("ploop check"), "\(r)")
            #expect(try dir.snapshot() == before, "\(format): files changed")
        }
    }

    @Test(arguments: corruptions)
    func mergeRefusesACorruptDestination(_ c: Corruption) throws {
        let dir = try ScratchDirectory()
        let src = try Images.make(dir, "src.hdd", clusters: [3])
        let dst = try Images.make(dir, "dst.hdd", clusters: [0, 1, 2])
        try Images.pokeEntry(dst, c.cluster, c.value)
        let before = try dir.snapshot()
        let r = try TestSupport.ploopLimited(["merge", src, dst])
        #expect(r.code == 11 && r.stderr.contains("dst.hdd is corrupt"), "\(r)")
        #expect(try dir.snapshot() == before)
    }

    @Test(arguments: corruptions)
    func growRefusesACorruptImage(_ c: Corruption) throws {
        let dir = try ScratchDirectory()
        let img = try Images.make(dir, "a.hdd", clusters: [0, 1, 2])
        try Images.pokeEntry(img, c.cluster, c.value)
        let before = try dir.snapshot()
        // 64 GiB of 32 KiB clusters needs a larger BAT: clusters would move.
        let r = try TestSupport.ploopLimited(["grow", "-s", "64g", img])
        #expect(r.code == 11 && r.stderr.contains("a.hdd is corrupt"), "\(r)")
        #expect(try dir.snapshot() == before)
    }

    // MARK: 6. check -F and a block used twice

    @Test func checkRepairsABlockUsedTwice() throws {
        let dir = try ScratchDirectory()
        let img = try Images.make(dir, "a.hdd", clusters: [0, 1, 2])
        try Images.pokeEntry(img, 5, 2)  // cluster 5 now shares cluster 1's block
        let plain = try TestSupport.ploopLimited(["check", "-f", img])
        #expect(plain.code == 11 && plain.stdout.contains("used more than once") && plain.stdout.contains("FATAL"), "\(plain)")
        let fixed = try TestSupport.ploopLimited(["check", "-F", img])
        #expect(fixed.code == 0 && fixed.stdout.contains("Fixed") && fixed.stdout.contains("repaired"), "\(fixed)")
        let again = try TestSupport.ploopLimited(["check", "-f", "-r", img])
        #expect(again.code == 0 && again.stdout.contains("no problems found"), "\(again)")
        // Cluster 5 keeps the data it read before, in a block of its own.
        let image = try Ploop1Image(file: try ImagePath.open(img, write: false), writable: false)
        #expect(image.block(of: ClusterIndex(5)) != image.block(of: ClusterIndex(1)))
        var b = [UInt8](repeating: 0, count: image.clusterBytes)
        for (c, fill) in [(UInt64(5), UInt8(2)), (1, 2), (0, 1), (2, 3)] {
            #expect(try b.withUnsafeMutableBytes { try image.read(cluster: ClusterIndex(c), into: $0) })
            #expect(b.allSatisfy { $0 == fill }, "cluster \(c)")
        }
    }

    // MARK: 7. a 4 GiB BAT, within 3 GiB of address space

    @Test func hugeSparseImageFitsInBoundedMemory() throws {
        let dir = try ScratchDirectory()
        let a = try Images.make(dir, "a.hdd", size: "32t", blocksize: "64")
        let b = try Images.make(dir, "b.hdd", size: "32t", blocksize: "64")
        // One cluster far out, written through the engine (its BAT in memory is two pages).
        let far = UInt64(32) << 40 / 32768 - 3
        let image = try Ploop1Image(file: try ImagePath.open(a, write: true), writable: true)
        let data = [UInt8](repeating: 0xAB, count: image.clusterBytes)
        try data.withUnsafeBytes { try image.write(cluster: ClusterIndex(far), data: $0) }
        try image.close()

        let info = try TestSupport.ploopLimited(["info", "--json", a])
        #expect(info.code == 0 && info.signal == nil, "\(info)")
        #expect(info.stdout.contains("\"allocatedClusters\" : 1"), "\(info)")
        let check = try TestSupport.ploopLimited(["check", "-f", "-r", "-c", a])
        #expect(check.code == 0 && check.signal == nil, "\(check)")
        // Holes below the one far cluster are one line, not a billion.
        #expect(check.stdout.split(separator: "\n").count < 5, "\(check.stdout.prefix(2000))")
        let merge = try TestSupport.ploopLimited(["merge", a, b])
        #expect(merge.code == 0 && merge.signal == nil, "\(merge)")
        #expect(merge.stdout.contains("1 cluster(s) copied"), "\(merge)")
        let merged = try Ploop1Image(file: try ImagePath.open(b, write: false), writable: false)
        var got = [UInt8](repeating: 0, count: merged.clusterBytes)
        #expect(try got.withUnsafeMutableBytes { try merged.read(cluster: ClusterIndex(far), into: $0) })
        #expect(got == data)
        #expect(merged.allocatedCount == 1)
    }

    // MARK: 8. names that are not UTF-8

    @Test func fileNamesStayBytes() throws {
        let dir = try ScratchDirectory()
        let r = try TestSupport.run("/bin/sh", ["-c", "\"$0\" init --no-descriptor -s 1m \"$(printf 'bad\\377.img')\" && \"$0\" info \"$(printf 'bad\\377.img')\"", TestSupport.ploopBinary], cwd: dir.path)
        #expect(r.code == 0, "\(r)")
        // readdir's bytes: exactly b a d 0xFF . i m g
        var names: [[UInt8]] = []
        let d = opendir(dir.path)!
        while let e = readdir(d) {
            let n = withUnsafeBytes(of: e.pointee.d_name) { Array($0.prefix { $0 != 0 }) }
            if n != Array(".".utf8) && n != Array("..".utf8) { names.append(n) }
        }
        closedir(d)
        #expect(names == [[0x62, 0x61, 0x64, 0xFF, 0x2E, 0x69, 0x6D, 0x67]])
        // The name replaced with U+FFFD is another file, which does not exist.
        let other = try TestSupport.ploop(["info", "bad\u{FFFD}.img"], cwd: dir.path)
        #expect(other.code == 4 && other.stderr.contains("no such file"), "\(other)")
    }

    // MARK: 9. messages

    struct Message: Sendable, CustomTestStringConvertible {
        var args: [String]
        var expect: String
        var code: Int32
        var testDescription: String { args.joined(separator: " ") }
    }

    static let messages = [
        Message(args: ["init", "-s", "-5", "new.hdd"], expect: "size \"-5\" is negative", code: 38),
        Message(args: ["grow", "-s", "-1g", "a.hdd"], expect: "size \"-1g\" is negative", code: 38),
        Message(args: ["init", "-s", "1m", "-b", "-64", "new.hdd"], expect: "-b -64: the cluster size is a power of two", code: 38),
        Message(args: ["init", "-s", "1m", "-v", "-1", "new.hdd"], expect: "-v -1: the header version is 1 or 2", code: 38),
        Message(args: ["merge", "-d", "/dev/ploop0", "-l", "-1..2"], expect: "-l -1..2: give L1..L2 or L", code: 38),
        Message(args: ["info", "loop1"], expect: "too many levels of symbolic links", code: 4),
        Message(args: ["info", "a.hdd/x"], expect: "a.hdd is not a folder", code: 4),
        Message(args: ["info", String(repeating: "n", count: 300)], expect: "too long", code: 4),
        Message(args: ["init", "-s", "1m", "nodir/new.hdd"], expect: "cannot create nodir/new.hdd: the folder nodir does not exist", code: 4),
        Message(args: ["init", "-s", "1m", "a.hdd/new.hdd"], expect: "a.hdd is not a folder", code: 4),
        Message(args: ["init", "-s", "1m", "dangling"], expect: "dangling already exists", code: 4),
        Message(args: ["balloon"], expect: "USAGE: ploop balloon", code: 38),
    ]

    @Test(arguments: messages)
    func messagesSayWhatIsWrong(_ m: Message) throws {
        let dir = try ScratchDirectory()
        try Images.make(dir, "a.hdd")
        try FileManager.default.createSymbolicLink(atPath: dir.file("loop1"), withDestinationPath: "loop2")
        try FileManager.default.createSymbolicLink(atPath: dir.file("loop2"), withDestinationPath: "loop1")
        try FileManager.default.createSymbolicLink(atPath: dir.file("dangling"), withDestinationPath: "nowhere")
        let before = try dir.snapshot()
        let r = try TestSupport.ploopLimited(m.args, cwd: dir.path)
        #expect(r.code == m.code, "\(r)")
        #expect(r.stderr.contains(m.expect), "\(r)")
        #expect(try dir.snapshot() == before)
    }

    @Test func levelsOutsideTheDeviceSayItsRange() throws {
        #expect(throws: CommandFailure.self) { try Ploop.Merge.levelRange("5", top: 2, device: "/dev/ploop0") }
        do { _ = try Ploop.Merge.levelRange("1..7", top: 2, device: "/dev/ploop0") } catch let e as CommandFailure {
            #expect(e.message == "-l 1..7: /dev/ploop0 has levels 0..2, so give L1..L2 with L1 < L2 <= 2")
        }
        #expect(try Ploop.Merge.levelRange("0..2", top: 2, device: "d") == 0...2)
        #expect(try Ploop.Merge.levelRange("1", top: 2, device: "d") == 1...2)
        #expect(try Ploop.Merge.levelRange(nil, top: 2, device: "d") == 1...2)
    }

    @Test func unknownBackendIsAnError() throws {
        let r = try TestSupport.run(TestSupport.ploopBinary, ["list"], environment: ["PLOOP_BACKEND": "kernal"])
        #expect(r.code == 38 && r.stderr.contains("PLOOP_BACKEND=kernal is not a backend"), "\(r)")
    }

    // MARK: 10. slow paths

    @Test func hugeInitIsQuickSparseAndAtomic() throws {
        let dir = try ScratchDirectory()
        // A dead init's leftover (nobody holds its lock) is removed by the next init.
        _ = FileManager.default.createFile(atPath: dir.file("big.hdd.init-999999"), contents: Data([1, 2, 3]))
        let r = try TestSupport.ploopLimited(["init", "--no-descriptor", "-b", "64", "-s", "50t", dir.file("big.hdd")])
        #expect(r.code == 0, "\(r)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["big.hdd"])
        var st = stat()
        #expect(stat(dir.file("big.hdd"), &st) == 0)
        #expect(st.st_size == 6_710_919_168)
        #expect(st.st_blocks * 512 < 1 << 20, "the zero BAT area is a hole")
        let check = try TestSupport.ploopLimited(["check", "-f", "-r", dir.file("big.hdd")])
        #expect(check.code == 0 && check.stdout.contains("no problems found"), "\(check)")
    }
}

/// Bytes of classic copy streams for the receiver tests.
enum CopyStreamBytes {
    static let payload = [UInt8](repeating: 0x5C, count: 4096)

    static func header(size: UInt32, position: UInt64) -> [UInt8] {
        var b = [UInt8]()
        b += withUnsafeBytes(of: UInt32(0x4cc0_ac3d).littleEndian) { Array($0) }
        b += withUnsafeBytes(of: size.littleEndian) { Array($0) }
        b += withUnsafeBytes(of: position.littleEndian) { Array($0) }
        return b
    }

    /// One data record at 0 (and a sync record, with `sync`), then the end record.
    static func valid(sync: Bool = false) -> [UInt8] {
        var s = header(size: 4096, position: 0) + payload
        if sync { s += header(size: 4, position: 0) + [0, 0, 0, 0] }
        return s + header(size: 0, position: 0)
    }
}
