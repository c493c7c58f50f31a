import PloopSystem

/// Block I/O on a device node, through `PloopSystem.File`'s full positional reads and writes.
public final class BlockDeviceIO: DeviceIO, Sendable {
    let file: File
    public init(file: File) { self.file = file }

    /// Opens a block device node for reading and writing.
    public convenience init(device: String) throws(DeviceError) {
        do { self.init(file: try File(path: device, mode: .readWrite)) } catch { throw .system("open \(device)", errno: error.errno) }
    }

    public var sizeBytes: UInt64 {
        get throws(DeviceError) {
            do { return try file.endOffset() } catch { throw .system("size of \(file.path)", errno: error.errno) }
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        let n: Int
        do { n = try file.read(into: buffer, at: offset) } catch { throw .system("read \(file.path)", errno: error.errno) }
        // A block device ends at its size: a short read is I/O past the end.
        if n < buffer.count { throw .outOfRange(offset: offset, length: buffer.count, size: (try? sizeBytes) ?? 0) }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        do { try file.write(buffer, at: offset) } catch { throw .system("write \(file.path)", errno: error.errno) }
    }

    /// BLKDISCARD: the block layer passes it to the driver (for the simulator: loop, then a FUSE
    /// PUNCH_HOLE).
    public func discard(at offset: UInt64, length: UInt64) throws(DeviceError) {
        do { try file.discard(at: offset, length: length) } catch { throw .system("BLKDISCARD on \(file.path)", errno: error.errno) }
    }

    public func flush() throws(DeviceError) {
        do { try file.sync() } catch { throw .system("fsync \(file.path)", errno: error.errno) }
    }
}
