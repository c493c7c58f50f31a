import ArgumentParser
import Foundation
import PloopDevice
import PloopDisk
import PloopFormat
import PloopImage
import PloopSystem
import PloopVolume

/// Scratch directories for temporary mounts: under the runtime directory, never in the disk's folder.
enum Scratch {
    static func directory() throws -> String {
        let dir = (ProcessInfo.processInfo.environment["PLOOP_RUNTIME_DIR"] ?? "/run/ploop") + "/scratch"
        do { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700]) } catch {
            throw CommandFailure("cannot create \(dir): \(error.localizedDescription)", code: ExitCodes.open)
        }
        return dir
    }
}

extension DiskCommands {
    struct FileSystemMount {
        var directory: String
        var type: String?
        var options: String?
        var fsck: Bool
    }

    /// Runs `body` on the device running the disk, or on one started for it (read-only with
    /// `readOnly`) and stopped again afterwards whatever happens.
    static func withDevice<T>(_ d: Disk, _ be: any DeviceBackend, readOnly: Bool = false, _ body: (String) throws -> T) throws -> T {
        if let running = DiskDevices.device(of: d, backend: be, anyLevel: true) { return try body(running.device) }
        let dev = try be.mount(MountRequest(images: d.chainPaths(), baseFormat: d.baseFormat, readOnly: readOnly, device: nil, clusterSectors: d.descriptor.blocksize))
        let result: T
        do { result = try body(dev) } catch {
            try? be.umount(dev)
            throw error
        }
        try be.umount(dev)
        return result
    }

    /// `init -t ext4|ext3`: the disk just made gets its partition, file system and balloon file on
    /// a device started for that and stopped again. Any failure removes every file init made.
    static func makeFileSystem(descriptor dd: String, options: FileSystem.MakeOptions, backend: BackendOptions, made: [String]) throws {
        do {
            let d = try Disk.open(dd)
            let be = try backend.backend.resolve()
            let scratch = try Scratch.directory()
            try withDevice(d, be) { dev in
                let vol = Volume(device: dev, backend: be, clusterSectors: UInt64(d.descriptor.blocksize)) { print($0) }
                let progress = ProgressLine.onTerminal()
                try vol.format(options, scratch: scratch, progress: progress)
            }
        } catch {
            for f in made { PathInfo.removeRegularFile(f) }
            if let folder = made.first.map({ ($0 as NSString).deletingLastPathComponent }) { PathInfo.syncParentDirectory(of: folder + "/.") }
            throw error
        }
    }

    /// The descriptor of the disk a device runs (from its top image), for the DEV forms.
    static func descriptor(ofDevice device: String, backend: BackendOptions) throws -> String {
        guard let node = PloopNode(device), node.partition == nil else { throw CommandFailure("\(device) is not a ploop device name (/dev/ploopN, or /dev/mapper/ploopN on dm-ploop)", code: ExitCodes.device) }
        let be = try backend.backend.resolve()
        guard let info = try? be.info(node.device), let top = info.levels.last else {
            throw CommandFailure("no ploop device \(node.device) (see 'ploop list')", code: ExitCodes.device)
        }
        guard let dd = DiskLookup.descriptor(naming: top.path) else {
            throw CommandFailure("\(node.device) runs \(top.path), which no DiskDescriptor.xml beside it names: give the disk", code: ExitCodes.param)
        }
        return dd
    }

    /// Whether the disk holds an ext file system (on partition 1, or on the whole device).
    static func hasFileSystem(_ d: Disk, _ be: any DeviceBackend) throws -> Bool {
        try withDevice(d, be, readOnly: true) { dev in
            let vol = Volume(device: dev, backend: be, clusterSectors: UInt64(d.descriptor.blocksize))
            return (try? FileSystem.superblock(vol.layout().node)) != nil
        }
    }

    /// Plain `info DD`: file-system usage as the original prints it (1k blocks and inodes), the
    /// file system mounted read-only for a moment where it is not mounted.
    static func usage(_ d: Disk) throws -> FileSystem.Usage? {
        guard let be = d.backend else { return nil }
        let scratch = try Scratch.directory()
        return try withDevice(d, be, readOnly: true) { dev in
            let vol = Volume(device: dev, backend: be, clusterSectors: UInt64(d.descriptor.blocksize))
            let layout = try vol.layout()
            if let m = Mounts.entries(of: layout.node).first { return try FileSystem.usage(m.target) }
            // A disk without a file system has no usage to show.
            guard (try? FileSystem.superblock(layout.node)) != nil else { return nil }
            return try vol.withTemporaryMount(layout.node, scratch: scratch, options: ["ro"]) { (dir) throws(VolumeError) in try FileSystem.usage(dir) }
        }
    }

    /// The original's table: resource, Size, Used in 1k blocks and inodes.
    static func printUsage(_ u: FileSystem.Usage) {
        func row(_ cells: [String]) -> String {
            zip(cells, [10, 14, 14]).map { c, n in String(repeating: " ", count: max(0, n - c.count)) + c }.joined(separator: " ")
        }
        print(row(["resource", "Size", "Used"]))
        print(row(["1k-blocks", "\(u.blocks * u.blockSize / 1024)", "\((u.blocks - u.blocksFree) * u.blockSize / 1024)"]))
        print(row(["inodes", "\(u.inodes)", "\(u.inodes - u.inodesFree)"]))
    }
}

extension Ploop {
    struct Resize: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Resize a disk with its partition and file system, up or down, mounted or not.",
            discussion: """
                Growing: the device grows (online if it runs, else the images offline), the GPT moves to \
                the new end and partition 1 is extended, then resize2fs grows the file system: online when \
                it is mounted and we hold CAP_SYS_RESOURCE, otherwise unmounted (and mounted back).

                Shrinking: the file system is unmounted if mounted, checked (e2fsck -f) and shrunk with \
                resize2fs, the partition and the GPT follow, and the image is cut: nothing of it lies past \
                the new end and its file is compacted. Refused, with the smallest size that fits, when the \
                file system holds too much; refused for a disk with snapshots or mounted read-only.

                Killed at any point, the disk still mounts; the same command run again finishes it.

                Examples:
                  ploop resize -s 20g /vz/private/101/root.hdd/DiskDescriptor.xml
                  ploop resize -s 5g /dev/ploop0
                """
        )

        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("New size of the disk: sectors, or bytes with k/m/g/t.", valueName: "size"))
        var size: String
        @OptionGroup var backend: BackendOptions
        @Flag(help: "Print the result as JSON.")
        var json = false
        @Argument(help: ArgumentHelp("DiskDescriptor.xml (or its folder), or the device running the disk.", valueName: "disk"))
        var disk: String

        func validate() throws { _ = try SizeOption.parse(size) }

        struct Report: Encodable {
            var descriptor: String
            var sizeSectors: UInt64
        }

        func run() throws {
            let sectors = try SizeOption.parse(size)
            let dd = disk.hasPrefix("/dev/") ? try DiskCommands.descriptor(ofDevice: disk, backend: backend) : disk
            let d = try DiskDevices.open(dd, backend: backend)
            let be = try d.backend ?? backend.backend.resolve()
            let json = self.json
            var r = DiskResize(disk: d, backend: be) { if !json { print($0) } }
            r.progress = ProgressLine.onTerminal()
            let size = try r.resize(toSectors: sectors)
            if json {
                print(try Output.json(Report(descriptor: d.descriptorPath, sizeSectors: size)))
            } else {
                say("Resized \(d.descriptorPath) to \(Output.size(size * 512))")
            }
        }
    }

    struct Fsck: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check the file system of a disk (e2fsck), repairing what is safe to repair.",
            discussion: """
                The disk must not be mounted with -m: its device is started for the check if it does not \
                run, and stopped again. -f checks a file system that looks clean too.

                Example:
                  ploop fsck -f /vz/private/101/root.hdd/DiskDescriptor.xml
                """
        )

        @Flag(name: .short, help: "Check even when the file system is marked clean.")
        var force = false
        @OptionGroup var backend: BackendOptions
        @Argument(help: ArgumentHelp("DiskDescriptor.xml (or its folder).", valueName: "disk"))
        var disk: String

        func run() throws {
            let d = try DiskDevices.open(disk, backend: backend)
            let be = try d.backend ?? backend.backend.resolve()
            let progress = ProgressLine.onTerminal()
            let force = self.force
            try DiskCommands.withDevice(d, be) { dev in
                let vol = Volume(device: dev, backend: be, clusterSectors: UInt64(d.descriptor.blocksize))
                let node = try vol.layout().node
                if let m = Mounts.entries(of: node).first {
                    throw VolumeError("\(node) is mounted at \(m.target): unmount it first ('ploop umount -m \(m.target)')", code: VolumeError.fsck)
                }
                try FileSystem.check(node, force: force, progress: progress)
                print("\(node): clean")
            }
        }
    }
}
