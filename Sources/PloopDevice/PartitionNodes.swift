import Foundation
import PloopSystem

/// `/dev/ploopNpK`: the nodes of a running device's partitions, made from what the kernel found
/// (sysfs), whatever block driver serves the device: the ploop driver (major 182, minor N×16+K)
/// or the simulator's loop device (the loop partition's numbers). No udev is assumed.
///
/// A kernel built without partition-table support (CONFIG_EFI_PARTITION off, as on small VM
/// kernels) finds none: then each partition the caller read from the table gets a loop device
/// of its own over the device node, limited to the partition's extent (`attachWindow`), and the
/// node leads to that. Such windows are detached when the device stops (`remove`).
public enum PartitionNodes {
    /// The ploop driver's block major.
    public static let ploopMajor: UInt32 = 182
    /// The loop driver's, and the extended-devt major its partitions get (loop's max_part is 0).
    static let loopMajor: UInt32 = 7
    public static let extendedMajor: UInt32 = 259

    public struct Found: Equatable, Sendable {
        public var number: Int
        public var major: UInt32
        public var minor: UInt32
        /// First sector and length in 512-byte sectors, as the kernel uses them.
        public var start: UInt64
        public var sectors: UInt64
    }

    public static func node(_ device: String, _ number: Int) -> String { "\(device)p\(number)" }

    /// The partitions the kernel knows on the block device behind `device`.
    public static func found(_ device: String) -> [Found] {
        guard let (major, minor) = BlockNode.numbers(device) else { return [] }
        let sys = URL(fileURLWithPath: "/sys/dev/block/\(major):\(minor)").resolvingSymlinksInPath().path
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: sys) else { return [] }
        return names.compactMap { name -> Found? in
            let dir = sys + "/" + name
            guard let n = read(dir + "/partition").flatMap({ Int($0) }),
                let dev = read(dir + "/dev")?.split(separator: ":").compactMap({ UInt32($0) }), dev.count == 2,
                let start = read(dir + "/start").flatMap({ UInt64($0) }), let size = read(dir + "/size").flatMap({ UInt64($0) })
            else { return nil }
            return Found(number: n, major: dev[0], minor: dev[1], start: start, sectors: size)
        }.sorted { $0.number < $1.number }
    }

    /// Makes a node for each partition the kernel found and removes our nodes of partitions
    /// that are gone. A node of another driver at one of the names is refused, untouched.
    @discardableResult
    public static func publish(_ device: String) throws(DeviceError) -> [Found] {
        guard let (deviceMajor, _) = BlockNode.numbers(device) else { throw .system("stat \(device)", errno: ENODEV) }
        let parts = found(device)
        for p in parts {
            let node = node(device, p.number)
            switch PathInfo.entryKind(node) {
            case .missing: break
            case .device:
                guard let (m, n) = BlockNode.numbers(node) else { break }
                if (m, n) == (p.major, p.minor) { continue }
                guard m == deviceMajor || m == ploopMajor || m == p.major else {
                    throw .invalid("\(node) is a device node of another driver: it is not replaced; remove it")
                }
                BlockNode.remove(node)
            case let other:
                throw .invalid("\(node) exists and is \(other), not a block device node: remove it")
            }
            do { try BlockNode.make(node, major: p.major, minor: p.minor) } catch {
                if error.code != .fileExists { throw .system("mknod \(node)", errno: error.errno) }
            }
        }
        let kept = Set(parts.map(\.number))
        let partitionMajors = Set(parts.map(\.major))
        for k in 1...15 where !kept.contains(k) {
            // Only nodes of the simulator's kind (not the ploop driver's, which udev or the user
            // may have made) are ours to remove.
            if let (m, _) = BlockNode.numbers(node(device, k)), m != ploopMajor, window(node(device, k)) == nil,
                m == deviceMajor || partitionMajors.contains(m) || m == extendedMajor
            {
                BlockNode.remove(node(device, k))
            }
        }
        return parts
    }

    /// A partition as the table says it is: number, first sector, length in sectors.
    public struct Expected: Equatable, Sendable {
        public var number: Int
        public var start: UInt64
        public var sectors: UInt64
        public init(number: Int, start: UInt64, sectors: UInt64) {
            self.number = number
            self.start = start
            self.sectors = sectors
        }
    }

    /// Nodes for the partitions of `expected`: the kernel's where it found them, else a loop
    /// window each. A window of the wrong extent (the table changed) is replaced.
    public static func publish(_ device: String, expected: [Expected]) throws(DeviceError) {
        let kernel = try publish(device)
        for e in expected where !kernel.contains(where: { $0.number == e.number }) {
            let node = node(device, e.number)
            if let w = window(node) {
                guard w.backing != device || w.offset != e.start * 512 || w.sizelimit != e.sectors * 512 else { continue }
                try detachWindow(node)
            }
            try attachWindow(device, e)
        }
    }

    /// A loop device over `device` showing only partition `e`, and its node.
    static func attachWindow(_ device: String, _ e: Expected) throws(DeviceError) {
        let node = node(device, e.number)
        switch PathInfo.entryKind(node) {
        case .missing: break
        case .device:
            // Ours only if it is a loop window over this device; anything else stays.
            guard window(node)?.backing == device || BlockNode.numbers(node).map({ $0.0 == loopMajor && window(node) == nil }) == true else {
                throw .invalid("\(node) is a device node of another driver: it is not replaced; remove it")
            }
            BlockNode.remove(node)
        case let other:
            throw .invalid("\(node) exists and is \(other), not a block device node: remove it")
        }
        let loop = try LoopDevice.attach(device, readOnly: false, offset: e.start * 512, sizeLimit: e.sectors * 512)
        guard let (maj, min) = BlockNode.numbers(loop) else {
            try? LoopDevice.detach(loop)
            throw .system("stat \(loop)", errno: ENODEV)
        }
        do { try BlockNode.make(node, major: maj, minor: min) } catch {
            try? LoopDevice.detach(loop)
            throw .system("mknod \(node)", errno: error.errno)
        }
    }

    struct Window {
        var loop: String
        var backing: String
        var offset: UInt64
        var sizelimit: UInt64
    }

    /// The loop window a node leads to, if it is one.
    static func window(_ node: String) -> Window? {
        guard let (maj, min) = BlockNode.numbers(node), maj == loopMajor else { return nil }
        let sys = URL(fileURLWithPath: "/sys/dev/block/\(maj):\(min)").resolvingSymlinksInPath().path
        guard let backing = read(sys + "/loop/backing_file"), let offset = read(sys + "/loop/offset").flatMap({ UInt64($0) }),
            let limit = read(sys + "/loop/sizelimit").flatMap({ UInt64($0) })
        else { return nil }
        return Window(loop: "/dev/" + (sys as NSString).lastPathComponent, backing: backing, offset: offset, sizelimit: limit)
    }

    static func detachWindow(_ node: String) throws(DeviceError) {
        guard let w = window(node) else { return }
        try LoopDevice.detach(w.loop)
        BlockNode.remove(node)
    }

    /// The length in sectors of the loop window `node` leads to; nil for a partition the kernel found.
    public static func windowSectors(_ node: String) -> UInt64? { window(node).map { $0.sizelimit / 512 } }

    /// Gives the loop window `node` leads to a new length (in place, also while mounted).
    public static func resizeWindow(_ node: String, sectors: UInt64) throws(DeviceError) {
        guard let w = window(node) else { throw .invalid("\(node) is not a loop window") }
        do { try LoopControl.setSizeLimit(w.loop, bytes: sectors * 512) } catch { throw .system("resizing \(w.loop) (\(node))", errno: error.errno) }
    }

    /// The processes (other than `excluded`) with `device` or one of its partition nodes open.
    public static func openers(_ device: String, excluding excluded: Set<Int32>) -> [BlockNode.Opener] {
        let nodes = [device] + (1...15).map { node(device, $0) }.filter { PathInfo.entryKind($0) == .device }
        return BlockNode.openers(of: nodes, excluding: excluded)
    }

    /// Whether a partition of `device` is held (mounted): the device must not stop then.
    public static func anyBusy(_ device: String) -> Bool {
        (1...15).contains { k in
            let n = node(device, k)
            return PathInfo.entryKind(n) == .device && BlockNode.isHeld(n)
        }
    }

    /// Detaches the loop windows over `device` and removes their nodes (before the device stops).
    public static func removeWindows(_ device: String) {
        for k in 1...15 where window(node(device, k))?.backing == device { try? detachWindow(node(device, k)) }
    }

    /// The kernel reads the table again (BLKRRPART), then the nodes follow. EBUSY while a
    /// partition is mounted: use `resize` for a mounted partition instead.
    @discardableResult
    public static func rescan(_ device: String) throws(DeviceError) -> [Found] {
        // udev-less hosts still see a short EBUSY right after the last close of a partition.
        for attempt in 0..<20 {
            do {
                try BlockNode.rereadPartitions(device)
                break
            } catch {
                if error.code != .resourceBusy || attempt == 19 { throw .system("re-reading the partition table of \(device)", errno: error.errno) }
            }
            Host.pause(milliseconds: 50)
        }
        return try publish(device)
    }

    /// Tells the kernel a partition's new extent (BLKPG resize), which works while it is mounted.
    public static func resize(_ device: String, number: Int, start: UInt64, sectors: UInt64) throws(DeviceError) {
        do { try BlockNode.change(device, .resize, number: number, start: start * 512, length: sectors * 512) } catch {
            throw .system("resizing partition \(number) of \(device) (BLKPG)", errno: error.errno)
        }
    }

    /// Removes the partition nodes of `device` that have `major` (the loop driver's, for a
    /// simulated device being torn down).
    public static func removeNodes(_ device: String, major: UInt32, partitionMajor: UInt32? = extendedMajor) {
        removeWindows(device)
        for k in 1...15 {
            let n = node(device, k)
            guard let (m, _) = BlockNode.numbers(n), m != ploopMajor, m == major || m == partitionMajor else { continue }
            BlockNode.remove(n)
        }
    }

    static func read(_ path: String) -> String? {
        (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
