import PloopImage
import Synchronization

/// Where the top image's writes are reported while dirty tracking (or a merge) watches them.
final class WriteWatch: Sendable {
    let tracker = Mutex<DirtyTracker?>(nil)

    func record(_ offset: UInt64, _ length: UInt64) {
        tracker.withLock { t in t?.record(offset: offset, length: length) }
    }
}

/// Passes through to the image file and reports every byte range it changes to a `WriteWatch`:
/// data, copy-ups, BAT entries and the header alike, since the copy stream is the file's bytes.
final class TrackingBlockFile: BlockFile {
    let base: any BlockFile
    let watch: WriteWatch
    var path: String { base.path }
    var descriptor: Int32? { base.descriptor }
    func descriptor(forReadingAt offset: UInt64, length: Int) -> Int32? { base.descriptor(forReadingAt: offset, length: length) }
    /// Writes through this descriptor bypass `write`: their issuer records them (`DeviceModel.finishDirect`).
    func directDescriptor(at offset: UInt64, length: Int) -> Int32? { base.directDescriptor(at: offset, length: length) }
    func metadataEnds(at offset: UInt64) { base.metadataEnds(at: offset) }

    init(_ base: any BlockFile, watch: WriteWatch) {
        self.base = base
        self.watch = watch
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(ImageError) -> Int {
        try base.read(into: buffer, at: offset)
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(ImageError) {
        try base.write(buffer, at: offset)
        watch.record(offset, UInt64(buffer.count))
    }

    func punchHole(at offset: UInt64, length: UInt64) throws(ImageError) {
        try base.punchHole(at: offset, length: length)
        watch.record(offset, length)
    }

    func sync() throws(ImageError) { try base.sync() }
    func truncate(to length: UInt64) throws(ImageError) { try base.truncate(to: length) }
    func size() throws(ImageError) -> UInt64 { try base.size() }

    func copy(from source: any BlockFile, at sourceOffset: UInt64, to offset: UInt64, length: Int, scratch: UnsafeMutableRawBufferPointer) throws(ImageError) {
        let src = (source as? TrackingBlockFile)?.base ?? source
        try base.copy(from: src, at: sourceOffset, to: offset, length: length, scratch: scratch)
        watch.record(offset, UInt64(length))
    }

    func allocate(at offset: UInt64, length: UInt64) throws(ImageError) {
        try base.allocate(at: offset, length: length)
        watch.record(offset, length)
    }
}
