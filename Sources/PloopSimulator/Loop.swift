import PloopSystem
import CPloopSys
import Foundation
import PloopDevice

/// Loop devices and the `/dev/ploopN` node that leads to one.
enum Loop {
    static func refreshCapacity(_ path: String) throws(DeviceError) {
        let r = cploop_loop_set_capacity(path)
        if r != 0 { throw .system("LOOP_SET_CAPACITY \(path)", errno: -r) }
    }

    /// Makes `/dev/ploopN` a block node with the loop device's numbers. A node the user made for
    /// the kernel driver (major 182) is replaced and its numbers returned, to restore on umount.
    static func linkNode(_ node: String, to loop: String) throws(DeviceError) -> [UInt32]? {
        guard let (maj, min) = LoopDevice.numbers(loop) else { throw .system("stat \(loop)", errno: ENODEV) }
        var replaced: [UInt32]?
        switch PathInfo.entryKind(node) {
        case .missing: break
        case .device:
            // Only a node of the ploop driver (put back on umount) or of the loop driver (a
            // simulated device's node left by a crash) is ours to replace.
            guard let (m, n) = LoopDevice.numbers(node), m == 182 || m == maj else {
                throw .invalid("\(node) is a device node of another driver: it is not replaced; remove it or choose another device")
            }
            if m == 182 { replaced = [m, n] }
            unlink(node)
        case let other:
            throw .invalid("\(node) exists and is \(other), not a block device node: remove it or choose another device")
        }
        let r = cploop_mknod_block(node, maj, min, 0o660)
        if r != 0 { throw .system("mknod \(node)", errno: -r) }
        return replaced
    }

    /// Removes `/dev/ploopN` and the partition nodes made for it.
    static func unlinkNode(_ node: String, restoring replaced: [UInt32]?) {
        if let (major, _) = LoopDevice.numbers(node), major != PartitionNodes.ploopMajor { PartitionNodes.removeNodes(node, major: major) }
        unlink(node)
        if let r = replaced, r.count == 2 { _ = cploop_mknod_block(node, r[0], r[1], 0o660) }
    }

    /// fsync of a block device node: its cached dirty pages are written to the device.
    static func flushBlockDevice(_ node: String) {
        let fd = open(node, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        fsync(fd)
        close(fd)
    }

    /// Whether a block device is held open exclusively (a mounted file system holds it).
    static func isBusy(_ node: String) -> Bool {
        let fd = open(node, O_RDONLY | O_EXCL | O_CLOEXEC)
        if fd < 0 { return errno == EBUSY }
        close(fd)
        return false
    }
}
