import Foundation
import PloopFormat
import Testing

/// Our GPT codec against sgdisk and sfdisk (independent readers) on a plain file.
struct GPTTests {
    static func tool(_ name: String) -> String? {
        ["/usr/sbin/", "/sbin/", "/usr/bin/"].map { $0 + name }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    static func run(_ exe: String, _ args: [String]) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    static func write(_ table: GPT.Table, to path: String) throws {
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        for w in GPT.writes(table) {
            try h.seek(toOffset: w.sector * 512)
            try h.write(contentsOf: w.bytes)
        }
        try h.close()
    }

    @Test(.enabled(if: tool("sgdisk") != nil && tool("sfdisk") != nil, "sgdisk or sfdisk missing (apt-get install gdisk fdisk)"))
    func sgdiskAndSfdiskReadWhatWeWrite() throws {
        let path = NSTemporaryDirectory() + "gpt-\(getpid()).img"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let sectors: UInt64 = 4 << 20  // 2 GiB
        FileManager.default.createFile(atPath: path, contents: nil)
        try FileHandle(forWritingTo: URL(fileURLWithPath: path)).truncate(atOffset: sectors * 512)
        let guid = GPT.randomGUID()
        let part = try #require(GPT.partition(diskSectors: sectors, clusterSectors: 2048, guid: guid))
        #expect(part.first == 2048 && (part.last + 1) % 2048 == 0 && part.last <= sectors - 34)
        let table = GPT.Table(diskSectors: sectors, diskGUID: GPT.randomGUID(), partitions: [part])
        try Self.write(table, to: path)
        let (vs, v) = try Self.run(Self.tool("sgdisk")!, ["-v", path])
        #expect(vs == 0 && v.contains("No problems found"), "\(v)")
        let (ss, json) = try Self.run(Self.tool("sfdisk")!, ["--json", path])
        #expect(ss == 0 && json.contains("\"start\": 2048") && json.contains("\"size\": \(part.sectors)"), "\(json)")
        #expect(json.lowercased().contains(GPT.guidText(guid).lowercased()), "\(json)")
        // Decoding gives back what was encoded, from the primary and from the copy.
        let bytes = try Array(Data(contentsOf: URL(fileURLWithPath: path)))
        let primary = try GPT.decode(header: Array(bytes[512..<1024]), entries: Array(bytes[1024..<(1024 + 16384)]), at: 1)
        #expect(primary == table)
        let last = Int(sectors - 1) * 512
        let copy = try GPT.decode(header: Array(bytes[last..<(last + 512)]), entries: Array(bytes[(last - 16384)..<last]), at: sectors - 1)
        #expect(copy == table)
        // One flipped byte in the entries is caught by the checksum.
        var damaged = Array(bytes[1024..<(1024 + 16384)])
        damaged[40] ^= 1
        #expect(throws: GPT.ReadError.self) { try GPT.decode(header: Array(bytes[512..<1024]), entries: damaged, at: 1) }
    }

    @Test func partitionEndsOnAClusterBoundaryForEverySize() {
        let sizes: [UInt64] = [100_000, 2_097_152, 2_097_152 + 17, 1 << 31]
        for sectors in sizes {
            let p = GPT.partition(diskSectors: sectors, clusterSectors: 2048, guid: GPT.randomGUID())!
            #expect(p.first % 2048 == 0 && (p.last + 1) % 2048 == 0 && p.last <= sectors - 34)
            #expect(GPT.lastSector(diskSectors: sectors, first: p.first, clusterSectors: 2048) == p.last)
        }
        #expect(GPT.partition(diskSectors: 2048, clusterSectors: 2048, guid: GPT.randomGUID()) == nil)
    }

    @Test func crcMatchesTheKnownValue() {
        #expect(CRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
    }
}
