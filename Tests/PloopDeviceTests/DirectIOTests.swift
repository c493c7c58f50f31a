import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

/// Why the temporary folder's file system takes no direct I/O, or nil.
enum DirectIOProbe {
    static let unavailable: String? = {
        guard let dir = try? ScratchDirectory("ploop-dio") else { return "no scratch folder" }
        let path = dir.file("probe")
        _ = FileManager.default.createFile(atPath: path, contents: Data(count: 4096))
        guard let plain = try? PosixBlockFile(path: path, mode: .readWrite) else { return "cannot open \(path)" }
        return DirectIO.twin(of: plain, writable: true).note
    }()
}

/// Image files with an `O_DIRECT` twin (how the simulator's daemon opens them): the same bytes as
/// through the page cache, whatever the offsets, lengths and memory alignment, and no pages left
/// in the host's cache by the data they carry.
@Suite(.enabled(if: DirectIOProbe.unavailable == nil, "\(DirectIOProbe.unavailable ?? "")"))
struct DirectIOTests {
    static func twin(_ path: String) throws -> PosixBlockFile {
        let plain = try PosixBlockFile(path: path, mode: .readWrite)
        let (file, note) = DirectIO.twin(of: plain, writable: true)
        #expect(note == nil, "\(note ?? "")")
        #expect(file.direct != nil)
        return file
    }

    /// Seeded reads and writes, aligned and not (offsets, lengths, memory), against the same
    /// calls on a plain file: every read returns the same bytes, and the files end the same.
    @Test func aDirectTwinReadsAndWritesWhatThePageCacheDoes() throws {
        let dir = try ScratchDirectory("ploop-dio")
        let a = dir.file("direct"), b = dir.file("plain")
        for p in [a, b] { _ = FileManager.default.createFile(atPath: p, contents: Data(repeating: 0xa5, count: 3 << 20)) }
        let direct = try Self.twin(a)
        let plain = try PosixBlockFile(path: b, mode: .readWrite)
        var rng: UInt64 = 0x5eed
        func next(_ n: Int) -> Int { Int(CrashStates.next(&rng) % UInt64(n)) }
        // A spare byte before each buffer moves it off alignment when asked.
        var memory = [UInt8](repeating: 0, count: (2 << 20) + 4096)
        var directCalls = 0
        for round in 0..<400 {
            let aligned = next(4) != 0
            let offset = aligned ? UInt64(next(7 << 10)) * 512 : UInt64(next(4 << 20))
            let length = aligned ? (1 + next(2048)) * 512 : 1 + next(1 << 20)
            let shift = next(3) == 0 ? 1 + next(511) : 0
            if aligned { directCalls += 1 }
            if next(2) == 0 {
                for i in 0..<length { memory[shift + i] = UInt8(truncatingIfNeeded: round &* 31 &+ i &* 7) }
                try memory.withUnsafeBytes { m in
                    let slice = UnsafeRawBufferPointer(rebasing: m[shift..<shift + length])
                    try direct.write(slice, at: offset)
                    try plain.write(slice, at: offset)
                }
            } else {
                var want = [UInt8](repeating: 0, count: length)
                let n1 = try want.withUnsafeMutableBytes { try plain.read(into: $0, at: offset) }
                let n2 = try memory.withUnsafeMutableBytes { m in
                    try direct.read(into: UnsafeMutableRawBufferPointer(rebasing: m[shift..<shift + length]), at: offset)
                }
                #expect(n1 == n2, "round \(round): read \(length) at \(offset): \(n2) bytes, the page cache \(n1)")
                #expect(Array(memory[shift..<shift + min(n1, n2)]) == Array(want[0..<min(n1, n2)]), "round \(round): read \(length) at \(offset) (memory +\(shift))")
            }
        }
        #expect(directCalls > 200)
        #expect(try Data(contentsOf: URL(fileURLWithPath: a)) == Data(contentsOf: URL(fileURLWithPath: b)))
    }

    /// What goes through the twin leaves no page in the host's cache; the same writes through a
    /// plain file do (so the check can fail).
    @Test(.enabled(if: !PageCache.onTmpfs(NSTemporaryDirectory()), "tmpfs keeps every file in the page cache"))
    func directWritesLeaveNothingInTheHostsPageCache() throws {
        let dir = try ScratchDirectory("ploop-dio")
        let a = dir.file("direct"), b = dir.file("plain")
        for p in [a, b] { _ = FileManager.default.createFile(atPath: p, contents: nil) }
        let direct = try Self.twin(a)
        let plain = try PosixBlockFile(path: b, mode: .readWrite)
        let data = [UInt8](repeating: 0x3c, count: 8 << 20)
        try direct.writeBytes(data, at: 0)
        try plain.writeBytes(data, at: 0)
        try direct.sync()
        try plain.sync()
        var back = [UInt8](repeating: 0, count: 8 << 20)
        _ = try back.withUnsafeMutableBytes { try direct.read(into: $0, at: 0) }
        #expect(back == data)
        let d = try #require(PageCache.resident(a, length: 8 << 20))
        let p = try #require(PageCache.resident(b, length: 8 << 20))
        #expect(d.resident == 0, "\(d.resident) of \(d.pages) pages of the direct file are cached")
        #expect(p.resident > p.pages / 2, "the plain file: \(p.resident) of \(p.pages) pages cached")
    }

    /// A ploop1 image opened by a direct opener: its header and BAT go through the page cache
    /// (never a direct write into a page a BAT entry write shares), its data clusters do not,
    /// and it reads back what was written.
    @Test(.enabled(if: !PageCache.onTmpfs(NSTemporaryDirectory()), "tmpfs keeps every file in the page cache"))
    func anImagesMetadataTakesThePageCacheAndItsDataDoesNot() throws {
        let dir = try ScratchDirectory("ploop-dio")
        let path = dir.file("root.hds")
        let header = try ImageHeader.new(sizeSectors: 64 << 11, clusterSectors: 2048, version: .v2)
        let made = try PosixBlockFile(path: path, mode: .createNew)
        try Ploop1Image.create(on: made, header: header)
        PageCache.drop(path)
        let opener = PosixOpener(locking: false, direct: true)
        let file = try opener.open(path, writable: true, lock: false)
        let image = try Ploop1Image(file: file, writable: true)
        let cluster = [UInt8](repeating: 0x77, count: 1 << 20)
        for c in [3, 9, 40] as [UInt64] {
            try cluster.withUnsafeBytes { try image.write(cluster: ClusterIndex(c), data: $0) }
        }
        try image.flush()
        let firstData = UInt64(header.firstBlockOffset) * 512
        #expect((file as? PosixBlockFile)?.metadataEnd == firstData)
        let data = try #require(PageCache.resident(path, offset: firstData, length: 3 << 20))
        #expect(data.resident == 0, "\(data.resident) of \(data.pages) data pages are cached")
        var back = [UInt8](repeating: 0, count: 1 << 20)
        for c in [3, 9, 40] as [UInt64] {
            #expect(try back.withUnsafeMutableBytes { try image.read(cluster: ClusterIndex(c), into: $0) })
            #expect(back == cluster, "cluster \(c)")
        }
        try image.close()
        var options = Checker.Options()
        options.readOnly = true
        options.force = true
        let check = try Checker.check(path: path, options: options)
        #expect(check.exitCode == 0 && check.findings.isEmpty, "\(check)")
    }

    /// Below where the metadata end, aligned I/O takes the page cache too; past it, it does not.
    @Test(.enabled(if: !PageCache.onTmpfs(NSTemporaryDirectory()), "tmpfs keeps every file in the page cache"))
    func theMetadataFloorKeepsAlignedWritesBelowItInThePageCache() throws {
        let dir = try ScratchDirectory("ploop-dio")
        let path = dir.file("img")
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        let file = try Self.twin(path)
        file.metadataEnds(at: 1 << 20)
        file.metadataEnds(at: 4096)  // never lowered
        #expect(file.metadataEnd == 1 << 20)
        try file.writeBytes([UInt8](repeating: 1, count: 1 << 20), at: 0)
        try file.writeBytes([UInt8](repeating: 2, count: 1 << 20), at: 1 << 20)
        try file.sync()
        let below = try #require(PageCache.resident(path, length: 1 << 20))
        let above = try #require(PageCache.resident(path, offset: 1 << 20, length: 1 << 20))
        #expect(below.resident == below.pages, "below the floor: \(below.resident) of \(below.pages) pages cached")
        #expect(above.resident == 0, "past the floor: \(above.resident) of \(above.pages) pages cached")
    }

    /// A file system that refuses `O_DIRECT`: the file goes through the page cache, and why is said.
    @Test func aRefusalOfDirectIOFallsBackToThePageCacheAndSaysSo() throws {
        let dir = try ScratchDirectory("ploop-dio")
        let path = dir.file("img")
        _ = FileManager.default.createFile(atPath: path, contents: Data(count: 4096))
        let plain = try PosixBlockFile(path: path, mode: .readWrite)
        let (file, note) = DirectIO.twin(of: plain, writable: true) { p, _ throws(SystemError) in
            throw SystemError("open", path: p, errno: EINVAL)
        }
        #expect(file === plain && file.direct == nil)
        #expect(note?.contains("no direct I/O (Invalid argument)") == true && note?.contains("page cache") == true, "\(note ?? "nil")")
    }
}

/// The bounce buffer of a thread goes with the thread: 400 threads that each fill one leave no
/// 400 MiB behind (resident memory is compared; the buffers are written, so they count).
struct ThreadScratchTests {
    static func residentBytes() -> Int {
        let statm = (try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8)) ?? ""
        let pages = statm.split(separator: " ").dropFirst().first.flatMap { Int($0) } ?? 0
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }

    @Test func aThreadsBufferIsFreedWhenTheThreadEnds() throws {
        let before = Self.residentBytes()
        for _ in 0..<400 {
            let done = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                guard let b = ThreadScratch.buffer(1 << 20) else { done.signal(); return }
                b.initializeMemory(as: UInt8.self, repeating: 0x5a)
                done.signal()
            }
            done.wait()
        }
        usleep(200_000)  // the last threads' exit
        let grown = Self.residentBytes() - before
        #expect(grown < 150 << 20, "resident memory grew by \(grown >> 20) MiB over 400 threads")
    }
}
