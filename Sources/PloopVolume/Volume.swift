import Foundation
import PloopDevice
import PloopDisk
import PloopFormat
import PloopSystem

/// The file system of a running device: on partition 1 of its GPT (`/dev/ploopNp1`), or on the
/// whole device for a disk without a table.
public struct Volume {
    public let device: String
    public let backend: any DeviceBackend
    public let clusterSectors: UInt64
    /// Progress and notes for the user (stdout).
    public var say: (String) -> Void

    public init(device: String, backend: any DeviceBackend, clusterSectors: UInt64, say: @escaping (String) -> Void = { _ in }) {
        self.device = device
        self.backend = backend
        self.clusterSectors = clusterSectors
        self.say = say
    }

    /// Where the file system lives.
    public struct Layout {
        public var node: String
        public var table: GPT.Table?
        public var partition: GPT.Partition? { table?.partitions.first }
    }

    func io() throws(VolumeError) -> any DeviceIO {
        do { return try backend.openIO(device) } catch { throw .device(error) }
    }

    /// The table and the node of partition 1 (made if the kernel knows the partition).
    public func layout() throws(VolumeError) -> Layout {
        guard let table = try PartitionTable.read(io()) else { return Layout(node: device, table: nil) }
        guard !table.partitions.isEmpty else {
            throw VolumeError("the partition table of \(device) has no partition: this is not a disk ploop made", code: VolumeError.changeGPT)
        }
        let expected = table.partitions.enumerated().map { i, p in PartitionNodes.Expected(number: i + 1, start: p.first, sectors: p.sectors) }
        do { try PartitionNodes.publish(device, expected: expected) } catch { throw .device(error) }
        let node = PartitionNodes.node(device, 1)
        guard PathInfo.kind(node) == .blockDevice else {
            throw VolumeError("\(device) has a partition table but the kernel shows no partition 1 (\(node)): is partition scanning off for this device?", code: VolumeError.changeGPT)
        }
        return Layout(node: node, table: table)
    }

    // MARK: - init -t

    /// A GPT with one partition aligned to the cluster size, the file system on it, and the
    /// empty hidden balloon file in its root (mounted for a moment under `scratch`).
    public func format(_ options: FileSystem.MakeOptions, scratch: String, progress: StepProgress? = nil) throws(VolumeError) {
        let sectors = try PartitionTable.deviceSectors(io())
        let guid = GPT.randomGUID()
        guard let part = GPT.partition(diskSectors: sectors, clusterSectors: clusterSectors, guid: GPT.randomGUID()) else {
            throw VolumeError("the disk is too small for a partition table and a file system: give a larger size", code: VolumeError.param)
        }
        try PartitionTable.write(GPT.Table(diskSectors: sectors, diskGUID: guid, partitions: [part]), to: io())
        // The kernel may scan partitions (ploop driver, loop with partition support) or not.
        _ = try? PartitionNodes.rescan(device)
        let l = try layout()
        say("Making an \(options.type) file system on \(l.node)")
        try FileSystem.make(l.node, options: options, clusterBytes: Int(clusterSectors) * 512, progress: progress)
        try withTemporaryMount(l.node, scratch: scratch) { (dir) throws(VolumeError) in try FileSystem.createBalloon(in: dir) }
    }

    /// Runs `body` with the file system mounted on a fresh directory under `scratch`, then
    /// unmounts it and removes the directory, whatever happened.
    public func withTemporaryMount<T>(_ node: String, scratch: String, options: [String] = [], _ body: (String) throws(VolumeError) -> T) throws(VolumeError) -> T {
        let dir = scratch + "/mnt.\(Host.processID).\(UInt32.random(in: 0...UInt32.max))"
        do { try Folder.make(dir) } catch { throw VolumeError("mkdir \(dir): \(error.message)", code: 27) }
        defer { Folder.removeEmpty(dir) }
        try FileSystem.mount(node, at: dir, type: nil, options: options)
        let result: T
        do { result = try body(dir) } catch {
            try? FileSystem.umount(dir)
            throw error
        }
        try FileSystem.umount(dir)
        return result
    }

    // MARK: - mount -m

    /// Mounts the file system on `directory`: fsck first with `fsck`, read-only with `readOnly`.
    public func mount(at directory: String, type: String?, options: [String], fsck: Bool, readOnly: Bool) throws(VolumeError) -> String {
        try Self.checkMountPoint(directory)
        let l = try layout()
        if fsck && !readOnly { try FileSystem.check(l.node, force: false) }
        try FileSystem.mount(l.node, at: directory, type: type, options: options + (readOnly ? ["ro"] : []))
        return l.node
    }

    /// A directory to mount on: it exists, is a directory and has nothing mounted on it.
    public static func checkMountPoint(_ directory: String) throws(VolumeError) {
        guard PathInfo.kind(directory) == .directory else {
            throw VolumeError("mount point \(directory) is not a directory: create it first (mkdir -p \(directory))", code: VolumeError.mount)
        }
        if Mounts.isMountPoint(directory) {
            throw VolumeError("\(directory) is busy: \(Mounts.device(at: directory) ?? "a file system") is mounted there; unmount it or choose another directory", code: VolumeError.mount)
        }
    }

    /// What is mounted from the volume now.
    public func mounted() throws(VolumeError) -> Mounts.Entry? {
        let node = try layout().node
        return Mounts.entries(of: node).first
    }
}
