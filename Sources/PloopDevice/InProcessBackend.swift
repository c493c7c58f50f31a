import PloopImage
import Synchronization

/// `DeviceBackend` on `DeviceModel`s in this process: for tests, and for tools that need a device
/// without one.
public final class InProcessBackend: DeviceBackend {
    public let name = "in-process"
    let opener: any ImageOpener
    private let devices = Mutex<[Int: DeviceModel]>([:])

    /// In-process devices do not lock their images: tests read them while mounted.
    public init(opener: any ImageOpener = PosixOpener(locking: false)) { self.opener = opener }

    func model(_ device: String) throws(DeviceError) -> DeviceModel {
        guard let n = DeviceName.index(device), let m = devices.withLock({ $0[n] }) else { throw .noSuchDevice(device) }
        return m
    }

    public func mount(_ request: MountRequest) throws(DeviceError) -> String {
        var wanted: Int?
        if let d = request.device {
            guard let n = DeviceName.index(d) else { throw .badDeviceName(d) }
            wanted = n
        }
        // One image may be in one running stack only.
        let inUse = devices.withLock { d in d.values.flatMap(\.imagePaths) }
        for p in request.images where inUse.contains(p) { throw .image(.locked(p)) }
        if let n = wanted, devices.withLock({ $0[n] }) != nil { throw .deviceInUse(DeviceName.name(n)) }
        let model = try DeviceModel(request, opener: opener)
        return devices.withLock { d in
            let n = wanted ?? (0...).first { d[$0] == nil }!
            d[n] = model
            return DeviceName.name(n)
        }
    }

    public func umount(_ device: String) throws(DeviceError) {
        let m = try model(device)
        try m.stop()
        _ = devices.withLock { $0.removeValue(forKey: DeviceName.index(device)!) }
    }

    public func snapshot(_ device: String, newDelta: String) throws(DeviceError) {
        try model(device).snapshot(newDelta: newDelta)
    }

    public func merge(_ device: String, levels: ClosedRange<Int>, progress: (@Sendable (Int, Int) -> Void)?) throws(DeviceError) -> [String] {
        try model(device).merge(levels: levels, progress: progress)
    }

    public func grow(_ device: String, sizeSectors: UInt64) throws(DeviceError) {
        try model(device).grow(toSectors: sizeSectors)
    }

    public func sync(_ device: String) throws(DeviceError) { try model(device).sync() }

    public func deleteDelta(_ device: String, level: Int) throws(DeviceError) { try model(device).deleteDelta(level: level) }

    public func updateIndex(_ device: String, level: Int, maps: [IndexMap]) throws(DeviceError) {
        try model(device).updateIndex(level: level, maps: maps)
    }

    public func balloon(_ device: String, inflate: Bool, keepIntact: Bool) throws(DeviceError) -> BalloonReply {
        try model(device).balloon(inflate: inflate, keepIntact: keepIntact)
    }

    public func loadFreeBlocks(_ device: String, level: Int, extents: [FreeExtent]) throws(DeviceError) -> UInt32 {
        try model(device).loadFreeBlocks(level: level, extents: extents)
    }

    public func freeBlockList(_ device: String) throws(DeviceError) -> [FreeExtent] { try model(device).freeBlockList() }

    public func filterFreeBlocks(_ device: String, minLength: UInt32) throws(DeviceError) {
        try model(device).filterFreeBlocks(minLength: minLength)
    }

    public func dropFreeBlocks(_ device: String) throws(DeviceError) { try model(device).dropFreeBlocks() }

    public func relocateBlocks(_ device: String, level: Int, allocHead: UInt32, extents: [RelocExtent]) throws(DeviceError) -> UInt32 {
        try model(device).relocateBlocks(level: level, allocHead: allocHead, extents: extents)
    }

    public func trackInit(_ device: String) throws(DeviceError) -> UInt64 { try model(device).trackInit() }
    public func trackSetPosition(_ device: String, _ position: UInt64) throws(DeviceError) { try model(device).trackSetPosition(position) }
    public func trackRead(_ device: String) throws(DeviceError) -> Range<UInt64>? { try model(device).trackRead() }
    public func trackStop(_ device: String) throws(DeviceError) { try model(device).trackStop() }
    public func trackAbort(_ device: String) throws(DeviceError) { try model(device).trackAbort() }

    public func info(_ device: String) throws(DeviceError) -> DeviceInfo {
        try model(device).info(device: device, backend: name)
    }

    public func list() throws(DeviceError) -> [DeviceInfo] {
        devices.withLock { d in d.sorted { $0.key < $1.key }.map { $0.value.info(device: DeviceName.name($0.key), backend: name) } }
    }

    public func openIO(_ device: String) throws(DeviceError) -> any DeviceIO { ModelIO(model: try model(device)) }
}

/// Block I/O straight on a model.
public struct ModelIO: DeviceIO {
    public let model: DeviceModel
    public init(model: DeviceModel) { self.model = model }
    public var sizeBytes: UInt64 { model.sizeBytes }
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        try model.read(into: buffer, at: offset)
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        try model.write(buffer, at: offset)
    }
    public func flush() throws(DeviceError) { try model.flush() }
    public func discard(at offset: UInt64, length: UInt64) throws(DeviceError) { try model.writeZeroes(at: offset, length: length) }
}
