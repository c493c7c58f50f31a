import PloopDevice
import PloopFormat

/// The GPT of a running device, read and written through its block node.
public enum PartitionTable {
    /// The table the device holds: the primary, or its copy at the end of the device (or at the
    /// end the primary names) when the primary is damaged. nil when there is none at all.
    public static func read(_ io: any DeviceIO) throws(VolumeError) -> GPT.Table? {
        let size = try deviceSectors(io)
        let primary = try sectors(io, 1, 1)
        if let t = try? decode(io, header: primary, at: 1) { return t }
        // The copy: at the device's end, or where a damaged primary says it is.
        var candidates = [size - 1]
        if let alternate = GPT.alternateSector(header: primary), alternate > 1, alternate < size - 1 { candidates.append(alternate) }
        var damage: GPT.ReadError = .none
        for lba in candidates {
            let h = try sectors(io, lba, 1)
            do { return try decode(io, header: h, at: lba) } catch { if error != .none { damage = error } }
        }
        if case .none = damage {
            if Array(primary.prefix(8)) == Array("EFI PART".utf8) { throw VolumeError("the GUID partition table of the disk is damaged: repair it with sgdisk, or restore the disk", code: VolumeError.changeGPT) }
            return nil
        }
        throw VolumeError("\(damage): repair it with sgdisk, or restore the disk", code: VolumeError.changeGPT)
    }

    static func decode(_ io: any DeviceIO, header: [UInt8], at lba: UInt64) throws(GPT.ReadError) -> GPT.Table {
        guard let (first, bytes) = GPT.entryArray(header: header) else { throw .none }
        let count = (bytes + GPT.sectorSize - 1) / GPT.sectorSize
        guard let entries = try? sectors(io, first, count) else { throw .corrupt("entry array at sector \(first) cannot be read") }
        return try GPT.decode(header: header, entries: Array(entries.prefix(bytes)), at: lba)
    }

    /// Writes `table` in GPT's safe order, each step flushed before the next.
    public static func write(_ table: GPT.Table, to io: any DeviceIO) throws(VolumeError) {
        for w in GPT.writes(table) {
            let failure: DeviceError? = w.bytes.withUnsafeBytes { b -> DeviceError? in
                do throws(DeviceError) {
                    try io.write(b, at: w.sector * UInt64(GPT.sectorSize))
                    try io.flush()
                    return nil
                } catch { return error }
            }
            if let failure { throw VolumeError("writing the partition table: \(failure)", code: VolumeError.changeGPT) }
        }
    }

    public static func deviceSectors(_ io: any DeviceIO) throws(VolumeError) -> UInt64 {
        do { return try io.sizeBytes / UInt64(GPT.sectorSize) } catch { throw .device(error) }
    }

    static func sectors(_ io: any DeviceIO, _ lba: UInt64, _ count: Int) throws(VolumeError) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count * GPT.sectorSize)
        let offset = lba * UInt64(GPT.sectorSize)
        let failure: DeviceError? = b.withUnsafeMutableBytes { p -> DeviceError? in
            do throws(DeviceError) { try io.read(into: p, at: offset); return nil } catch { return error }
        }
        if let failure { throw .device(failure) }
        return b
    }
}
