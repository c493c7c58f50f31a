import Foundation
import PloopDevice
import PloopDisk
import PloopFormat
import PloopSystem

/// `ploop resize -s SIZE DiskDescriptor.xml`: device, partition and file system in one command.
///
/// Grow: the device (online, or the images offline), then the GPT written for the new end (its
/// copy first) and partition 1 extended, then resize2fs: online on a mounted file system when we
/// hold CAP_SYS_RESOURCE, otherwise unmounted after e2fsck -f. Shrink: always unmounted: e2fsck
/// -f, the minimum checked, resize2fs down, the GPT written for the new end inside the old one,
/// the device stopped, the image cut and compacted (`Disk.shrink`), the device started again and
/// the file system mounted back where it was. Every step looks first at what is there, so a run
/// killed anywhere leaves a disk that mounts, and running the same resize again finishes it.
public struct DiskResize {
    public let disk: Disk
    public let backend: any DeviceBackend
    public var say: (String) -> Void
    /// Progress of e2fsck and resize2fs (set it where the output is a terminal).
    public var progress: StepProgress?

    public init(disk: Disk, backend: any DeviceBackend, say: @escaping (String) -> Void) {
        self.disk = disk
        self.backend = backend
        self.say = say
    }

    var clusterSectors: UInt64 { UInt64(disk.descriptor.blocksize) }

    /// The device running the disk from its top, if any.
    func running() -> DeviceInfo? {
        let top = PathInfo.identity(disk.path(of: disk.descriptor.topGUID))
        return ((try? backend.list()) ?? []).first { $0.levels.last.flatMap { PathInfo.identity($0.path) } == top }
    }

    func startDevice(_ name: String? = nil) throws -> String {
        // No device runs the disk: marks a crash left under the last one are stale.
        try disk.repairStaleMarks()
        return try backend.mount(MountRequest(images: disk.chainPaths(), baseFormat: disk.baseFormat, readOnly: false, device: name, clusterSectors: disk.descriptor.blocksize))
    }

    /// Resizes to `requested` sectors (rounded up to a cluster); returns the new size.
    public func resize(toSectors requested: UInt64) throws -> UInt64 {
        guard requested > 0 else { throw VolumeError("-s 0: give the new size of the disk (e.g. -s 20g)", code: VolumeError.param) }
        let target = (requested + clusterSectors - 1) / clusterSectors * clusterSectors
        let current = disk.descriptor.diskSizeSectors
        var dev = running()
        if let dev, dev.levels.last?.readOnly ?? false {
            throw VolumeError("\(disk.descriptorPath) is mounted read-only on \(dev.device): unmount it and mount it read-write to resize", code: VolumeError.param)
        }
        if let dev, dev.state != .off {
            throw VolumeError("\(dev.device) is in maintenance state \(dev.state): finish it first ('ploop balloon complete -d \(dev.device)')", code: 17)
        }
        if target >= current || (dev.map { $0.sizeBytes / 512 < target } ?? false) {
            // Also at the same size: a grow killed after the device grew is finished here.
            var started: String?
            if dev == nil {
                // Offline: the images grow first, then a device is started to reach the file system.
                try disk.grow(toSectors: target)
                started = try startDevice()
                dev = running()
            }
            defer { if let started { try? backend.umount(started) } }
            guard let dev else { throw VolumeError("the device of \(disk.descriptorPath) went away", code: VolumeError.device) }
            let changed = try grow(dev, to: target)
            // Opening the disk may have finished an interrupted resize (its journal): then this
            // run did its work.
            if !changed && target == current && disk.finishedOperation == nil {
                throw VolumeError("\(disk.descriptorPath) is \(Self.size(current)) already, with its partition and file system: nothing to do", code: VolumeError.param)
            }
            return target
        }
        try shrink(dev, to: target)
        return target
    }

    // MARK: - grow

    /// Returns whether anything had to change.
    func grow(_ dev: DeviceInfo, to target: UInt64) throws -> Bool {
        var changed = false
        let vol = Volume(device: dev.device, backend: backend, clusterSectors: clusterSectors, say: say)
        var mountedAt = try vol.mounted()
        if let m = mountedAt { Self.emptyBalloon(in: m.target) }
        if dev.sizeBytes / 512 < target {
            say("Growing \(dev.device) to \(Self.size(target))")
            try disk.growOnline(device: dev.device, backend: backend, toSectors: target)
            changed = true
        }
        if disk.descriptor.diskSizeSectors != target {
            try disk.commitSize(target)
            changed = true
        }
        var layout = try vol.layout()
        // A mounted file system that cannot grow in place is unmounted for the rest, and mounted
        // back at the end whatever happens.
        var remount: Mounts.Entry?
        defer { if let m = remount { try? FileSystem.mount(layout.node, at: m.target, type: m.type, options: Self.remountable(m.options)) } }
        func unmount(_ why: String) throws {
            guard let m = mountedAt else { return }
            say("\(why): unmounting \(m.target), resizing, mounting it back")
            try FileSystem.umount(m.target)
            remount = m
            mountedAt = nil
        }
        if var table = layout.table, let part = layout.partition {
            guard let last = GPT.lastSector(diskSectors: target, first: part.first, clusterSectors: clusterSectors) else {
                throw VolumeError("the partition cannot end inside the disk", code: VolumeError.changeGPT)
            }
            if table.diskSectors != target || part.last < last {
                say("Extending partition 1 to \(Self.size(last - part.first + 1))")
                table.diskSectors = target
                table.partitions[0].last = last
                try PartitionTable.write(table, to: try backend.openIO(dev.device))
                changed = true
            }
            if PartitionNodes.found(dev.device).first(where: { $0.number == 1 }).map({ $0.sectors < table.partitions[0].sectors }) ?? false, mountedAt != nil {
                // The kernel's own partition: told its new extent in place.
                try PartitionNodes.resize(dev.device, number: 1, start: part.first, sectors: table.partitions[0].sectors)
            } else {
                if let w = PartitionNodes.windowSectors(layout.node), w != table.partitions[0].sectors, mountedAt != nil {
                    // A loop window (no partition support in this kernel) grows in place; where
                    // the loop driver refuses, the file system is unmounted for the resize.
                    do { try PartitionNodes.resizeWindow(layout.node, sectors: table.partitions[0].sectors) } catch {
                        try unmount("The partition's loop window cannot grow in place (\(error))")
                    }
                }
                if mountedAt == nil { _ = try? PartitionNodes.rescan(dev.device) }
                layout = try vol.layout()
            }
        }
        let sb = try FileSystem.superblock(layout.node)
        let want = (layout.partition?.sectors ?? target) / (sb.blockSize / 512) * (sb.blockSize / 512)
        guard sb.sectors < want else { return changed }
        if mountedAt != nil && !Capabilities.hasSysResource() {
            try unmount("Without CAP_SYS_RESOURCE the file system cannot grow mounted")
        }
        if mountedAt != nil {
            say("Resizing the file system on \(layout.node) online")
        } else {
            say("Resizing the file system on \(layout.node)")
            try FileSystem.check(layout.node, force: true, progress: progress)
        }
        try FileSystem.resize(layout.node, toSectors: want, progress: progress)
        return true
    }

    // MARK: - shrink

    func shrink(_ running: DeviceInfo?, to target: UInt64) throws {
        guard disk.descriptor.images.count == 1 else {
            throw VolumeError("\(disk.descriptorPath) has snapshots: a disk with snapshots is not shrunk (merge them first: 'ploop snapshot-merge -A \(disk.descriptorPath)')", code: VolumeError.param)
        }
        let startedHere = running == nil
        let device = try running?.device ?? startDevice()
        var stopped = false
        defer { if startedHere && !stopped { try? backend.umount(device) } }
        let vol = Volume(device: device, backend: backend, clusterSectors: clusterSectors, say: say)
        let layout = try vol.layout()
        let first = layout.partition?.first ?? 0
        let newLast = layout.table == nil ? target - 1 : GPT.lastSector(diskSectors: target, first: first, clusterSectors: clusterSectors)
        guard let newLast, newLast >= first else { throw VolumeError("\(Self.size(target)) leaves no room for the partition", code: VolumeError.param) }
        let fsTarget = newLast - first + 1
        let sb = try FileSystem.superblock(layout.node)
        let mountedAt = Mounts.entries(of: layout.node).first
        if sb.sectors > fsTarget {
            // The size must be possible before anything is unmounted.
            if let m = mountedAt { try Self.refuseIfTooFull(mounted: m.target, superblock: sb, fsTarget: fsTarget, first: first, cluster: clusterSectors) }
            if let m = mountedAt {
                say("Unmounting \(m.target): the file system shrinks unmounted")
                try FileSystem.umount(m.target)
            }
            do {
                try FileSystem.check(layout.node, force: true, progress: progress)
                let minimum = try FileSystem.minimumSectors(layout.node, blockSize: sb.blockSize)
                if minimum > fsTarget {
                    throw VolumeError("the file system needs at least \(Self.size(minimum)); the smallest disk it fits is \(Self.size(Self.diskSize(forFS: minimum, first: first, cluster: clusterSectors))): give -s at least that, or delete files first", code: VolumeError.param)
                }
                say("Shrinking the file system on \(layout.node) to \(Self.size(fsTarget))")
                try FileSystem.resize(layout.node, toSectors: fsTarget, progress: progress)
            } catch {
                if let m = mountedAt { try? FileSystem.mount(layout.node, at: m.target, type: m.type, options: Self.remountable(m.options)) }
                throw error
            }
        } else if let m = mountedAt {
            try FileSystem.umount(m.target)
        }
        if var table = layout.table, table.diskSectors != target || table.partitions[0].last != newLast {
            table.diskSectors = target
            table.partitions[0].last = newLast
            try PartitionTable.write(table, to: try backend.openIO(device))
            _ = try? PartitionNodes.rescan(device)
            _ = try vol.layout()
        }
        say("Cutting \(disk.descriptorPath) to \(Self.size(target))")
        try backend.umount(device)
        stopped = true
        try disk.shrink(toSectors: target)
        guard !startedHere else { return }
        let again = try startDevice(device)
        if let m = mountedAt {
            let node = try Volume(device: again, backend: backend, clusterSectors: clusterSectors).layout().node
            try FileSystem.mount(node, at: m.target, type: m.type, options: Self.remountable(m.options))
        }
    }

    /// A mounted file system too full for the new size is refused before it is unmounted (its
    /// used blocks are a lower bound of what resize2fs will need).
    static func refuseIfTooFull(mounted dir: String, superblock sb: FileSystem.Superblock, fsTarget: UInt64, first: UInt64, cluster: UInt64) throws {
        let u = try FileSystem.usage(dir)
        let used = (u.blocks - u.blocksFree) * u.blockSize / 512
        if used > fsTarget {
            throw VolumeError("the file system holds \(size(used)), more than \(size(fsTarget)) fits: the smallest disk it fits is at least \(size(diskSize(forFS: used, first: first, cluster: cluster))); delete files or give a larger -s", code: VolumeError.param)
        }
    }

    /// The smallest disk (whole clusters) whose partition holds `fs` sectors.
    static func diskSize(forFS fs: UInt64, first: UInt64, cluster: UInt64) -> UInt64 {
        var n = (first + fs + 34 + cluster - 1) / cluster * cluster
        while (GPT.lastSector(diskSectors: n, first: first, clusterSectors: cluster) ?? 0) + 1 < first + fs { n += cluster }
        return n
    }

    /// Mount options to mount a file system back with (what /proc/mounts shows, minus what
    /// mount(8) adds by itself).
    static func remountable(_ options: [String]) -> [String] {
        options.filter { !["rw", "relatime", "seclabel"].contains($0) && !$0.hasPrefix("data=ordered") }
    }

    static func emptyBalloon(in mountPoint: String) {
        let p = mountPoint + "/" + FileSystem.balloonName
        if PathInfo.kind(p) == .regular { truncate(p, 0) }
    }

    static func size(_ sectors: UInt64) -> String {
        let bytes = Double(sectors) * 512
        for (unit, scale) in [("T", 0x1p40), ("G", 0x1p30), ("M", 0x1p20), ("K", 0x1p10)] as [(String, Double)] where bytes >= scale {
            return "\(String(format: "%.1f", bytes / scale))\(unit) (\(sectors) sectors)"
        }
        return "\(sectors) sectors"
    }
}

/// Linux capabilities of this process.
public enum Capabilities {
    /// CAP_SYS_RESOURCE (24) in the effective set: what ext4 wants for an online resize.
    public static func hasSysResource() -> Bool {
        guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
            let line = text.split(separator: "\n").first(where: { $0.hasPrefix("CapEff:") }),
            let mask = UInt64(line.dropFirst(7).trimmingCharacters(in: .whitespaces), radix: 16)
        else { return false }
        return mask & (1 << 24) != 0
    }
}
