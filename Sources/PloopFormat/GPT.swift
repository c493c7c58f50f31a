/// The GUID partition table of a container disk, as values: a protective MBR, the primary header
/// and entry array at the front, their copies at the end. Our own codec rather than sgdisk,
/// because a resize must write the table for a size the device does not have yet (a shrink
/// writes the copy at the new end while the device is still larger) and must choose the order of
/// its writes (copy first, then the primary entries, then the primary header: a crash between
/// any two leaves one valid table). sgdisk, sfdisk and the kernel read what this writes (tests).
public enum GPT {
    public static let sectorSize = 512
    /// Entries in each array (the usual 128 × 128 bytes = 32 sectors).
    public static let entryCount = 128
    public static let entrySize = 128
    static let entrySectors = entryCount * entrySize / sectorSize
    static let headerSize = 92
    /// The "Linux filesystem data" partition type.
    public static let linuxFilesystem: [UInt8] = guidBytes("0FC63DAF-8483-4772-8E79-3D69D8477DE4")!

    /// The one partition a container disk holds.
    public struct Partition: Equatable, Sendable {
        public var type: [UInt8]
        public var guid: [UInt8]
        /// First and last sector, inclusive (as GPT stores them).
        public var first: UInt64
        public var last: UInt64
        public var name: String
        public init(type: [UInt8] = GPT.linuxFilesystem, guid: [UInt8], first: UInt64, last: UInt64, name: String = "ploop") {
            self.type = type
            self.guid = guid
            self.first = first
            self.last = last
            self.name = name
        }
        public var sectors: UInt64 { last - first + 1 }
    }

    /// A table for a disk of `diskSectors`: its disk GUID and partitions.
    public struct Table: Equatable, Sendable {
        public var diskSectors: UInt64
        public var diskGUID: [UInt8]
        public var partitions: [Partition]
        public init(diskSectors: UInt64, diskGUID: [UInt8], partitions: [Partition]) {
            self.diskSectors = diskSectors
            self.diskGUID = diskGUID
            self.partitions = partitions
        }

        public var lastLBA: UInt64 { diskSectors - 1 }
        public var firstUsable: UInt64 { UInt64(2 + GPT.entrySectors) }
        public var lastUsable: UInt64 { lastLBA - UInt64(GPT.entrySectors) - 1 }
    }

    /// One write of whole sectors.
    public struct Write: Equatable, Sendable {
        public var sector: UInt64
        public var bytes: [UInt8]
    }

    /// The partition a container disk gets: from the first cluster boundary past the primary
    /// table to the last cluster boundary before the copy, so the file system starts and ends on
    /// cluster boundaries (the balloon frees whole clusters only).
    public static func partition(diskSectors: UInt64, clusterSectors: UInt64, guid: [UInt8]) -> Partition? {
        let probe = Table(diskSectors: diskSectors, diskGUID: guid, partitions: [])
        guard diskSectors > UInt64(2 * entrySectors + 3) else { return nil }
        let first = roundUp(probe.firstUsable, clusterSectors)
        let end = (probe.lastUsable + 1) / clusterSectors * clusterSectors
        guard end > first else { return nil }
        return Partition(guid: guid, first: first, last: end - 1)
    }

    /// The last sector a partition starting at `first` may end on in a disk of `diskSectors`,
    /// keeping the end on a cluster boundary.
    public static func lastSector(diskSectors: UInt64, first: UInt64, clusterSectors: UInt64) -> UInt64? {
        let probe = Table(diskSectors: diskSectors, diskGUID: [], partitions: [])
        guard diskSectors > UInt64(2 * entrySectors + 3) else { return nil }
        let end = (probe.lastUsable + 1) / clusterSectors * clusterSectors
        return end > first ? end - 1 : nil
    }

    static func roundUp(_ v: UInt64, _ m: UInt64) -> UInt64 { (v + m - 1) / m * m }

    /// The writes that put `table` on a disk, in the order that keeps one valid table at every
    /// point: the copy (entries, then its header) at the table's end, the primary entries, the
    /// primary header, and the protective MBR last.
    public static func writes(_ table: Table) -> [Write] {
        let entries = encodeEntries(table.partitions)
        let entriesCRC = CRC32.checksum(entries)
        let backupEntriesLBA = table.lastLBA - UInt64(entrySectors)
        let primary = encodeHeader(table, my: 1, alternate: table.lastLBA, entriesLBA: 2, entriesCRC: entriesCRC)
        let backup = encodeHeader(table, my: table.lastLBA, alternate: 1, entriesLBA: backupEntriesLBA, entriesCRC: entriesCRC)
        return [
            Write(sector: backupEntriesLBA, bytes: entries),
            Write(sector: table.lastLBA, bytes: backup),
            Write(sector: 2, bytes: entries),
            Write(sector: 1, bytes: primary),
            Write(sector: 0, bytes: protectiveMBR(diskSectors: table.diskSectors)),
        ]
    }

    static func encodeEntries(_ partitions: [Partition]) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: entryCount * entrySize)
        for (i, p) in partitions.enumerated() where i < entryCount {
            let at = i * entrySize
            b.replaceSubrange(at..<at + 16, with: p.type)
            b.replaceSubrange(at + 16..<at + 32, with: p.guid)
            LittleEndian.put(p.first, &b, at + 32)
            LittleEndian.put(p.last, &b, at + 40)
            for (k, unit) in p.name.utf16.prefix(36).enumerated() {
                b[at + 56 + 2 * k] = UInt8(unit & 0xFF)
                b[at + 57 + 2 * k] = UInt8(unit >> 8)
            }
        }
        return b
    }

    static func encodeHeader(_ t: Table, my: UInt64, alternate: UInt64, entriesLBA: UInt64, entriesCRC: UInt32) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: sectorSize)
        h.replaceSubrange(0..<8, with: Array("EFI PART".utf8))
        LittleEndian.put(UInt32(0x0001_0000), &h, 8)
        LittleEndian.put(UInt32(headerSize), &h, 12)
        LittleEndian.put(my, &h, 24)
        LittleEndian.put(alternate, &h, 32)
        LittleEndian.put(t.firstUsable, &h, 40)
        LittleEndian.put(t.lastUsable, &h, 48)
        h.replaceSubrange(56..<72, with: t.diskGUID)
        LittleEndian.put(entriesLBA, &h, 72)
        LittleEndian.put(UInt32(entryCount), &h, 80)
        LittleEndian.put(UInt32(entrySize), &h, 84)
        LittleEndian.put(entriesCRC, &h, 88)
        LittleEndian.put(CRC32.checksum(Array(h[0..<headerSize])), &h, 16)
        return h
    }

    static func protectiveMBR(diskSectors: UInt64) -> [UInt8] {
        var m = [UInt8](repeating: 0, count: sectorSize)
        let e = 446
        m[e + 1] = 0x00; m[e + 2] = 0x02; m[e + 3] = 0x00  // CHS of LBA 1
        m[e + 4] = 0xEE
        m[e + 5] = 0xFF; m[e + 6] = 0xFF; m[e + 7] = 0xFF
        LittleEndian.put(UInt32(1), &m, e + 8)
        LittleEndian.put(UInt32(min(diskSectors - 1, 0xFFFF_FFFF)), &m, e + 12)
        m[510] = 0x55
        m[511] = 0xAA
        return m
    }

    /// What reading a table found.
    public enum ReadError: Error, Equatable, CustomStringConvertible {
        case none
        case corrupt(String)
        public var description: String {
            switch self {
            case .none: "no GUID partition table"
            case .corrupt(let why): "the GUID partition table is damaged: \(why)"
            }
        }
    }

    /// Decodes the table from a header sector and its entry array (the primary or the copy);
    /// `diskSectors` is the size the header says, not necessarily the device's.
    public static func decode(header h: [UInt8], entries: [UInt8], at lba: UInt64) throws(ReadError) -> Table {
        guard h.count >= headerSize, Array(h[0..<8]) == Array("EFI PART".utf8) else { throw .none }
        let size = Int(LittleEndian.u32(h, 12))
        guard size >= headerSize, size <= h.count else { throw .corrupt("header size \(size)") }
        var zeroed = Array(h[0..<size])
        zeroed.replaceSubrange(16..<20, with: [0, 0, 0, 0])
        guard CRC32.checksum(zeroed) == LittleEndian.u32(h, 16) else { throw .corrupt("header checksum at sector \(lba)") }
        guard LittleEndian.u64(h, 24) == lba else { throw .corrupt("header at sector \(lba) says it is at \(LittleEndian.u64(h, 24))") }
        let count = Int(LittleEndian.u32(h, 80)), esize = Int(LittleEndian.u32(h, 84))
        guard esize >= 128, count * esize == entries.count else { throw .corrupt("\(count) entries of \(esize) bytes") }
        guard CRC32.checksum(entries) == LittleEndian.u32(h, 88) else { throw .corrupt("entry checksum (header at sector \(lba))") }
        let my = LittleEndian.u64(h, 24), alternate = LittleEndian.u64(h, 32)
        let last = max(my, alternate)
        var parts: [Partition] = []
        for i in 0..<count {
            let at = i * esize
            let type = Array(entries[at..<at + 16])
            if type.allSatisfy({ $0 == 0 }) { continue }
            var units: [UInt16] = []
            for k in 0..<36 {
                let u = UInt16(entries[at + 56 + 2 * k]) | UInt16(entries[at + 57 + 2 * k]) << 8
                if u == 0 { break }
                units.append(u)
            }
            parts.append(Partition(
                type: type, guid: Array(entries[at + 16..<at + 32]),
                first: LittleEndian.u64(entries, at + 32), last: LittleEndian.u64(entries, at + 40),
                name: String(decoding: units, as: UTF16.self)))
        }
        return Table(diskSectors: last + 1, diskGUID: Array(h[56..<72]), partitions: parts)
    }

    /// Where the entry array of a header lies: its first sector and its length in bytes.
    public static func entryArray(header h: [UInt8]) -> (sector: UInt64, bytes: Int)? {
        guard h.count >= headerSize, Array(h[0..<8]) == Array("EFI PART".utf8) else { return nil }
        let bytes = Int(LittleEndian.u32(h, 80)) * Int(LittleEndian.u32(h, 84))
        guard bytes > 0, bytes <= 1 << 20 else { return nil }
        return (LittleEndian.u64(h, 72), bytes)
    }

    /// The alternate header's sector a header names.
    public static func alternateSector(header h: [UInt8]) -> UInt64? {
        guard h.count >= headerSize, Array(h[0..<8]) == Array("EFI PART".utf8) else { return nil }
        return LittleEndian.u64(h, 32)
    }

    /// The 16 bytes of a GUID written as text, in GPT's mixed-endian order.
    public static func guidBytes(_ text: String) -> [UInt8]? {
        let hex = text.filter { $0 != "-" && $0 != "{" && $0 != "}" }
        guard hex.count == 32 else { return nil }
        var raw: [UInt8] = []
        var i = hex.startIndex
        while i < hex.endIndex {
            let j = hex.index(i, offsetBy: 2)
            guard let v = UInt8(hex[i..<j], radix: 16) else { return nil }
            raw.append(v)
            i = j
        }
        return Array(raw[0..<4].reversed()) + Array(raw[4..<6].reversed()) + Array(raw[6..<8].reversed()) + Array(raw[8..<16])
    }

    /// The text form of GPT GUID bytes (upper case, as sgdisk prints it).
    public static func guidText(_ b: [UInt8]) -> String {
        let order = Array(b[0..<4].reversed()) + Array(b[4..<6].reversed()) + Array(b[6..<8].reversed()) + Array(b[8..<16])
        let hex = order.map { String($0, radix: 16, uppercase: true).leftPadded(2) }
        return hex[0..<4].joined() + "-" + hex[4..<6].joined() + "-" + hex[6..<8].joined() + "-" + hex[8..<10].joined() + "-" + hex[10..<16].joined()
    }

    /// A random version-4 GUID in GPT byte order.
    public static func randomGUID() -> [UInt8] {
        var g = (0..<16).map { _ in UInt8.random(in: 0...255) }
        g[7] = (g[7] & 0x0F) | 0x40
        g[8] = (g[8] & 0x3F) | 0x80
        return g
    }
}

extension String {
    func leftPadded(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}

/// CRC-32 (IEEE 802.3, reflected, as GPT and zlib use).
public enum CRC32 {
    static let table: [UInt32] = (0..<256).map { n in
        var c = UInt32(n)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var c: UInt32 = 0xFFFF_FFFF
        for b in bytes { c = table[Int((c ^ UInt32(b)) & 0xFF)] ^ (c >> 8) }
        return c ^ 0xFFFF_FFFF
    }
}
