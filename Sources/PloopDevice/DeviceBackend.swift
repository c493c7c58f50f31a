import PloopImage

/// The device operations at the level the kernel's ioctls offer them. Procedures (balloon, copy)
/// and commands are written against this, once; the kernel backend, the simulator's socket client
/// and the in-process backend implement it.
public protocol DeviceBackend: Sendable {
    /// "kernel", "simulator" or "in-process".
    var name: String { get }

    /// Stacks the images on a device and starts it; returns the device name (`/dev/ploopN`).
    func mount(_ request: MountRequest) throws(DeviceError) -> String
    /// Stops the device (flush, clear the in-use mark) and releases it.
    func umount(_ device: String) throws(DeviceError)
    func snapshot(_ device: String, newDelta: String) throws(DeviceError)
    /// Online merge of levels l1...l2; returns the files that left the stack.
    func merge(_ device: String, levels: ClosedRange<Int>, progress: (@Sendable (Int, Int) -> Void)?) throws(DeviceError) -> [String]
    /// Finishes an online merge of the top that stopped after the two upper levels changed
    /// places (dm-ploop's reverse merge, after `flip_upper_deltas`): the level below the top, the
    /// old top, goes up into the top. Returns the files that left the stack. Backends whose
    /// merges never swap levels refuse.
    func finishSwappedMerge(_ device: String) throws(DeviceError) -> [String]
    func grow(_ device: String, sizeSectors: UInt64) throws(DeviceError)
    /// Whether the device has the legacy driver's balloon ioctls (free blocks, relocation, the
    /// maintenance states). Without them (dm-ploop) a balloon is a file operation only.
    var balloonIoctls: Bool { get }
    func sync(_ device: String) throws(DeviceError)
    /// PLOOP_IOC_DEL_DELTA: a read-only level whose data user space merged into the level below
    /// leaves the stack (see `DeviceModel.deleteDelta`).
    func deleteDelta(_ device: String, level: Int) throws(DeviceError)
    /// PLOOP_IOC_UPDATE_INDEX: clusters of a read-only level moved in its file.
    func updateIndex(_ device: String, level: Int, maps: [IndexMap]) throws(DeviceError)

    func balloon(_ device: String, inflate: Bool, keepIntact: Bool) throws(DeviceError) -> BalloonReply
    func loadFreeBlocks(_ device: String, level: Int, extents: [FreeExtent]) throws(DeviceError) -> UInt32
    func freeBlockList(_ device: String) throws(DeviceError) -> [FreeExtent]
    func filterFreeBlocks(_ device: String, minLength: UInt32) throws(DeviceError)
    func dropFreeBlocks(_ device: String) throws(DeviceError)
    func relocateBlocks(_ device: String, level: Int, allocHead: UInt32, extents: [RelocExtent]) throws(DeviceError) -> UInt32

    func trackInit(_ device: String) throws(DeviceError) -> UInt64
    func trackSetPosition(_ device: String, _ position: UInt64) throws(DeviceError)
    /// The next dirty extent in bytes of the top image, or nil when there is none now (EAGAIN).
    func trackRead(_ device: String) throws(DeviceError) -> Range<UInt64>?
    func trackStop(_ device: String) throws(DeviceError)
    func trackAbort(_ device: String) throws(DeviceError)

    func info(_ device: String) throws(DeviceError) -> DeviceInfo
    func list() throws(DeviceError) -> [DeviceInfo]
    /// Block I/O on the device (the block node for real backends).
    func openIO(_ device: String) throws(DeviceError) -> any DeviceIO
}

extension DeviceBackend {
    public var balloonIoctls: Bool { true }

    public func finishSwappedMerge(_ device: String) throws(DeviceError) -> [String] {
        throw .notSupported("the \(name) backend never swaps a device's levels: \(device) has no swapped merge to finish")
    }

    /// The maintenance state, without changing it (BALLOON with keep-intact).
    public func state(_ device: String) throws(DeviceError) -> MaintenanceState {
        try balloon(device, inflate: false, keepIntact: true).state
    }
}

/// Device names follow the manual: `/dev/ploopN`, minor N×16 (16 minors per device for partitions).
public enum DeviceName {
    public static func name(_ index: Int) -> String { "/dev/ploop\(index)" }

    /// The N of `/dev/ploopN` (also accepts `ploopN`).
    public static func index(_ name: String) -> Int? {
        let base = name.hasPrefix("/dev/") ? String(name.dropFirst(5)) : name
        let digits = base.dropFirst(5)
        guard base.hasPrefix("ploop"), (1...5).contains(digits.count), digits.allSatisfy({ $0.isASCII && $0.isNumber }),
            let n = Int(digits), n < 1 << 16
        else { return nil }
        return n
    }

    public static func minor(_ index: Int) -> Int { index << 4 }

    /// A ploop device as the user may name it, written as the backends name it: `/dev/ploopN`
    /// (the legacy driver, the simulator; `ploopN` alone too) or `/dev/mapper/ploopN` (dm-ploop,
    /// whose N the original picks up to 66534). nil for anything else.
    public static func canonical(_ name: String) -> String? {
        if name.hasPrefix("/dev/mapper/") {
            let digits = name.dropFirst(12 + 5)
            guard name.dropFirst(12).hasPrefix("ploop"), (1...5).contains(digits.count), digits.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
            return name
        }
        return index(name).map(Self.name)
    }
}
