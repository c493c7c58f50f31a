import Foundation
import PloopCopy
import PloopTestSupport
import Testing

private func hex(_ b: [UInt8]) -> String { b.map { String(format: "%02x", $0) }.joined() }

/// Golden bytes of each record type: the original's classic stream, little-endian.
struct StreamGoldenTests {
    @Test func dataHeader() {
        #expect(hex(CopyStream.header(size: 1024, position: 0x1122_3344_5566_7788)) == "3dacc04c000400008877665544332211")
    }

    @Test func syncRecord() {
        #expect(hex(CopyStream.encode(.sync)) == "3dacc04c04000000000000000000000000000000")
    }

    @Test func endRecord() {
        #expect(hex(CopyStream.encode(.end)) == "3dacc04c000000000000000000000000")
    }

    @Test func dataRecord() {
        #expect(hex(CopyStream.encode(.data(position: 512, bytes: [1, 2, 3, 4, 5]))) == "3dacc04c05000000000200000000000001020304" + "05")
    }
}

/// The receiver on hostile input: every bad stream is a clear error and nothing is published.
struct ReceiverTests {
    /// Feeds `bytes` through a pipe to a receiver writing `dest`; returns its result.
    static func receive(_ bytes: [UInt8], into dest: String, replace: Bool = false, feedback: Bool = false) -> (Result<CopyReceiver.Summary, any Error>, [UInt8]) {
        var fds: [Int32] = [0, 0]
        var fb: [Int32] = [0, 0]
        pipe(&fds)
        if feedback { pipe(&fb) }
        let writeEnd = fds[1]
        let writer = Thread {
            bytes.withUnsafeBytes { b in
                var off = 0
                while off < b.count {
                    let n = write(writeEnd, b.baseAddress! + off, b.count - off)
                    if n <= 0 { break }
                    off += n
                }
            }
            close(writeEnd)
        }
        signal(SIGPIPE, SIG_IGN)
        writer.start()
        let r = Result { try CopyReceiver(destination: dest, replace: replace).receive(input: fds[0], feedback: feedback ? fb[1] : nil) }
        close(fds[0])
        var answers = [UInt8]()
        if feedback {
            close(fb[1])
            var buf = [UInt8](repeating: 0, count: 64)
            while true {
                let n = read(fb[0], &buf, 64)
                if n <= 0 { break }
                answers += buf[0..<n]
            }
            close(fb[0])
        }
        return (r, answers)
    }

    static func stream(_ records: [CopyStream.Record]) -> [UInt8] { records.flatMap(CopyStream.encode) }

    static func leftovers(_ dir: ScratchDirectory) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
    }

    @Test func buildsTheImageAndAnswersSyncs() throws {
        let dir = try ScratchDirectory()
        let a = [UInt8](repeating: 0xAA, count: 4096), b = [UInt8](repeating: 0xBB, count: 100)
        let (r, answers) = Self.receive(Self.stream([.data(position: 8192, bytes: a), .sync, .data(position: 0, bytes: b), .end]), into: dir.file("img"), feedback: true)
        let s = try r.get()
        #expect(s.records == 2 && s.bytes == 4196 && s.syncs == 1)
        #expect(answers == Array("SUCCESS\n".utf8))
        var want = [UInt8](repeating: 0, count: 8192 + 4096)
        want.replaceSubrange(0..<100, with: b)
        want.replaceSubrange(8192..<12288, with: a)
        #expect(dir.read("img") == want)
        #expect(try Self.leftovers(dir) == ["img"])
    }

    struct Bad: Sendable, CustomTestStringConvertible {
        var name: String
        var bytes: [UInt8]
        var error: CopyStream.Error
        var testDescription: String { name }
    }

    static let good = stream([.data(position: 0, bytes: [UInt8](repeating: 7, count: 1000))])

    static let bad: [Bad] = [
        Bad(name: "wrong marker", bytes: [0xde, 0xad, 0xbe, 0xef] + Array(stream([.end]).dropFirst(4)), error: .badMarker(0xefbe_adde, at: 0)),
        Bad(name: "record of 1 GiB", bytes: CopyStream.header(size: 1 << 30, position: 0), error: .recordTooLarge(1 << 30, at: 0)),
        Bad(name: "position past any image", bytes: CopyStream.header(size: 512, position: 1 << 62), error: .positionOutOfRange(1 << 62, at: 0)),
        Bad(name: "no end record", bytes: good, error: .truncated(at: 1016)),
        Bad(name: "cut inside a payload", bytes: Array(good.prefix(500)), error: .truncated(at: 16)),
        Bad(name: "cut inside a header", bytes: good + Array(stream([.end]).prefix(7)), error: .truncated(at: 1016)),
        Bad(name: "empty", bytes: [], error: .truncated(at: 0)),
        Bad(name: "garbage after good records", bytes: good + [UInt8](repeating: 0x41, count: 64), error: .badMarker(0x4141_4141, at: 1016)),
    ]

    @Test(arguments: bad)
    func refusesAndPublishesNothing(_ b: Bad) throws {
        let dir = try ScratchDirectory()
        let (r, _) = Self.receive(b.bytes, into: dir.file("img"))
        #expect(throws: b.error) { try r.get() }
        #expect(try Self.leftovers(dir).isEmpty)
    }

    @Test func existingDestinationIsRefusedUntouched() throws {
        let dir = try ScratchDirectory()
        dir.write("img", [1, 2, 3])
        let (r, _) = Self.receive(Self.stream([.end]), into: dir.file("img"))
        #expect(throws: CopyStream.Error.destinationExists(dir.file("img"))) { try r.get() }
        #expect(dir.read("img") == [1, 2, 3])
        let (r2, _) = Self.receive(Self.stream([.data(position: 0, bytes: [9, 9, 9, 9, 9]), .end]), into: dir.file("img"), replace: true)
        _ = try r2.get()
        #expect(dir.read("img") == [9, 9, 9, 9, 9])
    }

    /// A short fuzz run (CI): mutated and cut valid streams never crash the receiver, and a failed
    /// receive never leaves a file behind. `scripts/fuzz` runs it longer.
    @Test func fuzzMutatedStreams() throws {
        let iterations = Int(ProcessInfo.processInfo.environment["PLOOP_FUZZ_ITERATIONS"] ?? "300")!
        var rng = XorShift(seed: 0x1234_5678_9abc_def1)
        func next() -> UInt64 { rng.next() }
        let base = Self.stream([.data(position: 4096, bytes: [UInt8](repeating: 3, count: 2000)), .sync, .data(position: 0, bytes: [UInt8](repeating: 5, count: 300)), .end])
        for i in 0..<iterations {
            var s = base
            for _ in 0..<(1 + Int(next() % 4)) { s[Int(next() % UInt64(s.count))] = UInt8(truncatingIfNeeded: next()) }
            if next() % 3 == 0 { s = Array(s.prefix(Int(next() % UInt64(s.count)))) }
            let dir = try ScratchDirectory("ploop-fuzz")
            let (r, _) = Self.receive(s, into: dir.file("img"))
            switch r {
            case .success: #expect(try Self.leftovers(dir) == ["img"], "iteration \(i)")
            case .failure: #expect(try Self.leftovers(dir).isEmpty, "iteration \(i)")
            }
        }
    }
}
