import Foundation
import PloopCopy
import PloopDevice
import PloopFormat
import PloopImage
import PloopTestSupport
import Synchronization
import Testing

/// A real in-process device whose TRACK_READ calls can be preceded by writes at chosen moments,
/// so the tracker's wrap-around can be driven exactly.
final class HookedBackend: DeviceBackend {
    let inner = InProcessBackend()
    let name = "hooked"
    /// Called before the n-th TRACK_READ (from 1), with the device's I/O.
    let beforeTrackRead: @Sendable (Int, any DeviceIO) throws -> Void
    private let reads = Mutex(0)

    init(beforeTrackRead: @escaping @Sendable (Int, any DeviceIO) throws -> Void) { self.beforeTrackRead = beforeTrackRead }

    func trackRead(_ device: String) throws(DeviceError) -> Range<UInt64>? {
        let n = reads.withLock { $0 += 1; return $0 }
        do { try beforeTrackRead(n, try inner.openIO(device)) } catch { throw .invalid("hook: \(error)") }
        return try inner.trackRead(device)
    }

    func mount(_ request: MountRequest) throws(DeviceError) -> String { try inner.mount(request) }
    func umount(_ device: String) throws(DeviceError) { try inner.umount(device) }
    func snapshot(_ device: String, newDelta: String) throws(DeviceError) { try inner.snapshot(device, newDelta: newDelta) }
    func merge(_ device: String, levels: ClosedRange<Int>, progress: (@Sendable (Int, Int) -> Void)?) throws(DeviceError) -> [String] {
        try inner.merge(device, levels: levels, progress: progress)
    }
    func grow(_ device: String, sizeSectors: UInt64) throws(DeviceError) { try inner.grow(device, sizeSectors: sizeSectors) }
    func sync(_ device: String) throws(DeviceError) { try inner.sync(device) }
    func deleteDelta(_ device: String, level: Int) throws(DeviceError) { try inner.deleteDelta(device, level: level) }
    func updateIndex(_ device: String, level: Int, maps: [IndexMap]) throws(DeviceError) { try inner.updateIndex(device, level: level, maps: maps) }
    func balloon(_ device: String, inflate: Bool, keepIntact: Bool) throws(DeviceError) -> BalloonReply {
        try inner.balloon(device, inflate: inflate, keepIntact: keepIntact)
    }
    func loadFreeBlocks(_ device: String, level: Int, extents: [FreeExtent]) throws(DeviceError) -> UInt32 {
        try inner.loadFreeBlocks(device, level: level, extents: extents)
    }
    func freeBlockList(_ device: String) throws(DeviceError) -> [FreeExtent] { try inner.freeBlockList(device) }
    func filterFreeBlocks(_ device: String, minLength: UInt32) throws(DeviceError) { try inner.filterFreeBlocks(device, minLength: minLength) }
    func dropFreeBlocks(_ device: String) throws(DeviceError) { try inner.dropFreeBlocks(device) }
    func relocateBlocks(_ device: String, level: Int, allocHead: UInt32, extents: [RelocExtent]) throws(DeviceError) -> UInt32 {
        try inner.relocateBlocks(device, level: level, allocHead: allocHead, extents: extents)
    }
    func trackInit(_ device: String) throws(DeviceError) -> UInt64 { try inner.trackInit(device) }
    func trackSetPosition(_ device: String, _ position: UInt64) throws(DeviceError) { try inner.trackSetPosition(device, position) }
    func trackStop(_ device: String) throws(DeviceError) { try inner.trackStop(device) }
    func trackAbort(_ device: String) throws(DeviceError) { try inner.trackAbort(device) }
    func info(_ device: String) throws(DeviceError) -> DeviceInfo { try inner.info(device) }
    func list() throws(DeviceError) -> [DeviceInfo] { try inner.list() }
    func openIO(_ device: String) throws(DeviceError) -> any DeviceIO { try inner.openIO(device) }
}

struct SenderTests {
    static let cs: UInt32 = 128
    static var cb: Int { Int(cs) * 512 }

    /// A write that lands behind the tracker's cursor while a pass runs makes the next TRACK_READ
    /// wrap around; that extent is handed over once and must reach the copy.
    @Test func anExtentThatWrapsThePassIsSent() throws {
        let dir = try ScratchDirectory("ploop-sender")
        let base = dir.file("base")
        try Offline.initialize(.init(path: base, sizeSectors: 64 * UInt64(Self.cs), clusterSectors: Self.cs))
        let be = HookedBackend { n, io in
            let at: UInt64? = switch n {
            case 1: 50 * UInt64(Self.cb)  // ahead of the cursor: read in this pass
            case 2: 2 * UInt64(Self.cb)  // behind it: the next read wraps
            default: nil
            }
            if let at { try DeviceContent.pattern(4096, seed: at).withUnsafeBytes { try io.write($0, at: at) } }
        }
        let d = try be.mount(MountRequest(images: [base]))
        let io = try be.openIO(d)
        try DeviceContent.pattern(64 * Self.cb, seed: 1).withUnsafeBytes { try io.write($0, at: 0) }
        let copy = dir.file("copy")
        let report = try CopySender(backend: be, device: d, mountPoint: nil, stopCommand: nil).run(into: try FileSink(destination: copy))
        #expect(report.passes >= 3)
        let want = try DeviceContent.readAll(io)
        try be.umount(d)
        let other = InProcessBackend()
        let d2 = try other.mount(MountRequest(images: [copy], readOnly: true))
        let got = try DeviceContent.readAll(try other.openIO(d2))
        try other.umount(d2)
        #expect(got.count == want.count)
        let differ = (0..<64).filter { c in got[c * Self.cb..<(c + 1) * Self.cb] != want[c * Self.cb..<(c + 1) * Self.cb] }
        #expect(differ.isEmpty, "clusters that differ in the copy: \(differ)")
    }
}
