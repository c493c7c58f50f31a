import CPloopSys
import Glibc

/// Block device nodes: made where no udev runs, their numbers, whether something holds them,
/// and the partition ioctls (BLKRRPART, BLKPG).
public enum BlockNode {
    /// The major and minor numbers of a block device node; nil for anything else or nothing.
    public static func numbers(_ path: String) -> (major: UInt32, minor: UInt32)? {
        var major: UInt32 = 0, minor: UInt32 = 0
        return RawPath.withCString(path) { cploop_block_numbers($0, &major, &minor) } == 0 ? (major, minor) : nil
    }

    /// `mknod(2)` of a block node. EEXIST is an error like any other (callers that accept an
    /// existing node test `code == .fileExists`).
    public static func make(_ path: String, major: UInt32, minor: UInt32, permissions: mode_t = 0o660) throws(SystemError) {
        try shim("mknod", path) { RawPath.withCString(path) { cploop_mknod_block($0, major, minor, UInt32(permissions)) } }
    }

    /// Removes a node (or whatever entry is at `path`; callers prove it is theirs first).
    public static func remove(_ path: String) { PathInfo.remove(path) }

    /// Whether an exclusive holder (a mounted file system, a partition in use) has the device:
    /// an `O_EXCL` open fails with EBUSY.
    public static func isHeld(_ path: String) -> Bool {
        do { _ = try File(path: path, mode: .exclusiveDevice) } catch { return error.code == .resourceBusy }
        return false
    }

    /// A process that has a block device open, as `/proc` shows it.
    public struct Opener: Sendable, Equatable, CustomStringConvertible {
        public var pid: Int32
        public var command: String
        public var description: String { "\(pid) (\(command))" }
    }

    /// The processes other than `excluded` with the block device of `path` (by its numbers) open,
    /// from `/proc/PID/fd`. What the kernel itself holds (a loop device's backing, a mounted file
    /// system) is not a process's descriptor and is not listed.
    public static func openers(_ path: String, excluding excluded: Set<Int32> = []) -> [Opener] {
        openers(of: [path], excluding: excluded)
    }

    /// The processes with any of the block devices of `paths` open, each once; `/proc` is read
    /// once for all of them.
    public static func openers(of paths: [String], excluding excluded: Set<Int32> = []) -> [Opener] {
        let wanted = Set(paths.compactMap { numbers($0).map { UInt64($0.major) << 32 | UInt64($0.minor) } })
        guard !wanted.isEmpty else { return [] }
        var out: [Opener] = []
        for name in Folder.names("/proc") {
            guard let pid = Int32(name), !excluded.contains(pid) else { continue }
            let fds = "/proc/\(pid)/fd"
            let holds = Folder.names(fds).contains { fd in
                numbers(fds + "/" + fd).map { wanted.contains(UInt64($0.major) << 32 | UInt64($0.minor)) } ?? false
            }
            if holds { out.append(Opener(pid: pid, command: Host.command(of: pid) ?? "?")) }
        }
        return out
    }

    /// `fsync(2)` of the node: the block layer's cached dirty pages reach the driver.
    public static func flush(_ path: String) {
        guard let f = try? File(path: path, mode: .readOnly) else { return }
        try? f.sync()
    }

    /// BLKRRPART: the kernel reads the partition table again (EBUSY while a partition is held).
    public static func rereadPartitions(_ path: String) throws(SystemError) {
        try shim("BLKRRPART", path) { RawPath.withCString(path) { cploop_reread_partitions($0) } }
    }

    /// BLKPG's operations on one partition.
    public enum PartitionChange: Int32, Sendable {
        case add = 1
        case delete = 2
        case resize = 3
    }

    /// BLKPG on partition `number` of the disk at `path`, extent in bytes. Works while other
    /// partitions (or, for resize, the partition itself) are mounted.
    public static func change(_ path: String, _ change: PartitionChange, number: Int, start: UInt64, length: UInt64) throws(SystemError) {
        try shim("BLKPG", path) { RawPath.withCString(path) { cploop_blkpg_partition($0, change.rawValue, Int32(number), start, length) } }
    }
}

/// The loop driver: free devices from /dev/loop-control, attached to a file (or a window of it),
/// cleared, resized.
public enum LoopControl {
    /// LOOP_CTL_GET_FREE: the index of a free loop device.
    public static func freeIndex() throws(SystemError) -> Int {
        Int(try shim("LOOP_CTL_GET_FREE", "/dev/loop-control") { cploop_loop_get_free() })
    }

    /// LOOP_CONFIGURE of `loop` over [offset, offset + sizeLimit) of `file` (0: to its end), with
    /// partition scanning. EBUSY when another process configured it first.
    public static func configure(_ loop: String, file: File, directIO: Bool, readOnly: Bool, offset: UInt64, sizeLimit: UInt64) throws(SystemError) {
        try shim("LOOP_CONFIGURE", loop) {
            RawPath.withCString(loop) { cploop_loop_configure_range($0, file.fd, directIO ? 1 : 0, readOnly ? 1 : 0, offset, sizeLimit) }
        }
    }

    /// LOOP_CLR_FD.
    public static func clear(_ loop: String) throws(SystemError) {
        try shim("LOOP_CLR_FD", loop) { RawPath.withCString(loop) { cploop_loop_clear($0) } }
    }

    /// LOOP_SET_STATUS64 with a new size limit; the kernel announces the capacity, also while the
    /// device is mounted.
    public static func setSizeLimit(_ loop: String, bytes: UInt64) throws(SystemError) {
        try shim("LOOP_SET_STATUS64", loop) { RawPath.withCString(loop) { cploop_loop_set_sizelimit($0, bytes) } }
    }

    /// LOOP_SET_CAPACITY: the loop device takes the backing file's new size.
    public static func reloadCapacity(_ loop: String) throws(SystemError) {
        try shim("LOOP_SET_CAPACITY", loop) { RawPath.withCString(loop) { cploop_loop_set_capacity($0) } }
    }
}

extension File {
    /// BLKDISCARD of [offset, offset + length) on a block device.
    public func discard(at offset: UInt64, length: UInt64) throws(SystemError) {
        try shim("BLKDISCARD", path) { cploop_blkdiscard(fd, offset, length) }
    }

    /// `ioctl(2)` with a pointer argument (the kernel driver's requests): 0 or `-errno`, as the
    /// driver answered; an answer is the caller's to interpret, so nothing is thrown or retried.
    public func control(_ request: UInt, _ argument: UnsafeMutableRawPointer?) -> Int32 {
        cploop_ioctl(fd, request, argument)
    }
}
