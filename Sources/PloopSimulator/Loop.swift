import PloopSystem
import Foundation
import PloopDevice

/// Loop devices and the `/dev/ploopN` node that leads to one.
enum Loop {
    static func refreshCapacity(_ path: String) throws(DeviceError) {
        do { try LoopControl.reloadCapacity(path) } catch { throw .system("LOOP_SET_CAPACITY \(path)", errno: error.errno) }
    }

    /// Makes `/dev/ploopN` a block node with the loop device's numbers. A node the user made for
    /// the kernel driver (major 182) is replaced and its numbers returned, to restore on umount.
    static func linkNode(_ node: String, to loop: String) throws(DeviceError) -> [UInt32]? {
        guard let (maj, min) = BlockNode.numbers(loop) else { throw .system("stat \(loop)", errno: ENODEV) }
        var replaced: [UInt32]?
        switch PathInfo.entryKind(node) {
        case .missing: break
        case .device:
            // Only a node of the ploop driver (put back on umount) or of the loop driver (a
            // simulated device's node left by a crash) is ours to replace.
            guard let (m, n) = BlockNode.numbers(node), m == 182 || m == maj else {
                throw .invalid("\(node) is a device node of another driver: it is not replaced; remove it or choose another device")
            }
            if m == 182 { replaced = [m, n] }
            BlockNode.remove(node)
        case let other:
            throw .invalid("\(node) exists and is \(other), not a block device node: remove it or choose another device")
        }
        do { try BlockNode.make(node, major: maj, minor: min) } catch { throw .system("mknod \(node)", errno: error.errno) }
        return replaced
    }

    /// Removes `/dev/ploopN` and the partition nodes made for it.
    static func unlinkNode(_ node: String, restoring replaced: [UInt32]?) {
        if let (major, _) = BlockNode.numbers(node), major != PartitionNodes.ploopMajor { PartitionNodes.removeNodes(node, major: major) }
        BlockNode.remove(node)
        if let r = replaced, r.count == 2 { try? BlockNode.make(node, major: r[0], minor: r[1]) }
    }
}
