import Foundation
import PloopCopy
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

/// `ploop copy -d` (the receiver) stopped, failed or cut by a power loss at each of its file
/// changes: the destination is never half there, a failure says what failed, and the next
/// receive finishes the job.
@Suite struct CopyReceiveFaultTests {
    /// Three data records (one across a sync), the last one out of order.
    static let records: [CopyStream.Record] = [
        .data(position: 0, bytes: pattern(0x11, 65536)), .sync,
        .data(position: 1 << 20, bytes: pattern(0x22, 8192)), .sync,
        .data(position: 131072, bytes: pattern(0x33, 4096)), .end,
    ]

    static func pattern(_ seed: UInt8, _ count: Int) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7) ^ seed } }

    static var expected: [UInt8] {
        var b = [UInt8](repeating: 0, count: (1 << 20) + 8192)
        for case .data(let p, let bytes) in records { b.replaceSubrange(Int(p)..<Int(p) + bytes.count, with: bytes) }
        return b
    }

    static func receive(_ dir: ScratchDirectory, stream: String, environment: [String: String] = [:]) throws -> TestSupport.Result {
        try TestSupport.run("/bin/sh", ["-c", "exec \"$0\" copy -d \"$1\" < \"$2\"", TestSupport.ploopBinary, dir.file("img"), stream], environment: environment)
    }

    static func files(_ dir: ScratchDirectory) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted().filter { $0 != "stream" }
    }

    @Test func killedAtEveryChangeIsNeverHalfPublishedAndIsFinishedByTheNextReceive() throws {
        let dir = try ScratchDirectory("ploop-copykill")
        let stream = dir.file("stream")
        try Data(Self.records.flatMap(CopyStream.encode)).write(to: URL(fileURLWithPath: stream))
        var kills = 0
        for n in 1...200 {
            let r = try Self.receive(dir, stream: stream, environment: ["PLOOP_TEST_CRASH_AT": "\(n)"])
            let img = dir.file("img")
            if r.code == 0 {
                #expect(FileManager.default.contents(atPath: img).map(Array.init) == Self.expected)
                #expect(try Self.files(dir) == ["img"])
                break
            }
            #expect(r.code == 137, "change \(n): \(r)")
            kills += 1
            // Published whole or not at all; a dead receiver's part file is left for the next.
            if let now = FileManager.default.contents(atPath: img) {
                #expect(Array(now) == Self.expected, "change \(n): a published image with other content")
                try FileManager.default.removeItem(atPath: img)
            }
            let again = try Self.receive(dir, stream: stream)
            #expect(again.code == 0, "receive after a kill at change \(n): \(again)")
            #expect(FileManager.default.contents(atPath: img).map(Array.init) == Self.expected, "after a kill at change \(n)")
            #expect(try Self.files(dir) == ["img"], "leftovers after a kill at change \(n)")
            try FileManager.default.removeItem(atPath: img)
        }
        #expect(kills >= 5, "the receive made only \(kills) changes: the hook is not reached")
        print("copy receive: killed at \(kills) changes")
    }

    @Test func anIOErrorAtEveryChangeFailsCleanly() throws {
        let dir = try ScratchDirectory("ploop-copyfault")
        let stream = dir.file("stream")
        try Data(Self.records.flatMap(CopyStream.encode)).write(to: URL(fileURLWithPath: stream))
        var faults = 0, failed = 0
        for n in 1...200 {
            let errno = n % 2 == 1 ? "EIO" : "ENOSPC"
            let r = try Self.receive(dir, stream: stream, environment: ["PLOOP_TEST_FAULT": "\(errno)@\(n)"])
            let img = dir.file("img")
            guard r.stderr.contains("injected") else {
                #expect(r.code == 0, "no fault at change \(n), yet: \(r)")
                break
            }
            faults += 1
            if r.code == 0 {
                // A failed clean-up step (the stale-part scan) may be lived with; the image is whole.
                #expect(FileManager.default.contents(atPath: img).map(Array.init) == Self.expected, "change \(n): \(r)")
                try FileManager.default.removeItem(atPath: img)
                continue
            }
            failed += 1
            #expect(r.code != 137, "change \(n): \(r)")
            let message = r.stderr.split(separator: "\n").filter { !$0.hasPrefix("ploop-test:") }.joined(separator: "\n")
            #expect(message.contains(img) && (message.contains("Input/output error") || message.contains("No space left")), "change \(n) (\(errno)): \(r.stderr)")
            let left = try Self.files(dir)
            #expect(left.isEmpty, "a failed receive (\(errno) at change \(n)) left \(left)")
            let again = try Self.receive(dir, stream: stream)
            #expect(again.code == 0 && FileManager.default.contents(atPath: img).map(Array.init) == Self.expected, "after \(errno) at change \(n): \(again)")
            try FileManager.default.removeItem(atPath: img)
        }
        #expect(failed >= 5, "only \(failed) of \(faults) faults failed the receive: the hook is not reached")
        print("faults injected: copy receive: \(faults), \(failed) failed it")
    }

    /// A power cut at any point of the receive (FolderLog: unsynced data lost, kept or torn per
    /// file, unsynced names an ordered prefix): the folder holds no image or the whole one, and
    /// the next receive (the image removed first, as a sender would after a failed copy)
    /// builds it and leaves nothing else.
    @Test func everyPowerCutStateHoldsNoImageOrTheWholeOne() throws {
        let root = try ScratchDirectory("ploop-copycut")
        let stream = root.file("stream")
        try Data(Self.records.flatMap(CopyStream.encode)).write(to: URL(fileURLWithPath: stream))
        let dir = root.file("dest")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
        let img = dir + "/img"
        let logPath = root.file("changes.log")
        let receive = { (env: [String: String]) in
            try TestSupport.run("/bin/sh", ["-c", "exec \"$0\" copy -d \"$1\" < \"$2\"", TestSupport.ploopBinary, img, stream], environment: env)
        }
        let r = try receive([ChangeRecorder.variable: logPath])
        #expect(r.code == 0, "\(r)")
        let log = FolderLog(Array(try Data(contentsOf: URL(fileURLWithPath: logPath))), folder: URL(fileURLWithPath: dir).standardizedFileURL.path)
        #expect(log.entries.count > 4, "the recorder saw \(log.entries.count) changes")
        let states = log.states(initial: [:], randomSubsets: CrashStates.subsets(4), cutsPerRun: 8)
        var withImage = 0
        for s in states {
            if let b = s.files["img"] {
                #expect(b == Self.expected, "\(s.name): a published image with other content (\(b.count) bytes)")
                withImage += 1
            }
            try FolderLog.materialize(s.files, at: dir)
            try? FileManager.default.removeItem(atPath: img)
            let again = try receive([:])
            #expect(again.code == 0, "\(s.name): the next receive: \(again)")
            #expect(FileManager.default.contents(atPath: img).map(Array.init) == Self.expected, "\(s.name): the next receive's image")
            let left = try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
            #expect(left == ["img"], "\(s.name): the next receive left \(left)")
        }
        #expect(withImage > 0 && withImage < states.count)
        print("power-cut states: copy receive: \(states.count) from \(log.entries.count) changes")
    }
}
