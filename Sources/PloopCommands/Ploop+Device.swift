import ArgumentParser
import Foundation
import PloopDevice
import PloopDisk
import PloopFormat
import PloopImage
import PloopVolume
import PloopSimulator
import PloopSystem
import CPloopSys

extension Ploop {
    struct Mount: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Stack images on a ploop device and start it.",
            discussion: """
                BASE is level 0 (raw with -f raw, else ploop1); each DELTA stacks on top, the last one \
                writable. Without -d the first free /dev/ploopN is chosen and printed. With -m the file \
                system on the device is mounted there too. An image marked in use (left by a crash) is \
                checked and repaired first; an image a running device holds is refused.

                On a kernel without the ploop module the device is served by the simulator: a daemon \
                serving the model through FUSE, a loop device on it, and /dev/ploopN leading to that.

                Examples (from the manual):
                  ploop mount -d /dev/ploop0 root.hdd
                  ploop mount -m /mnt root.hdd root.hdd.1
                """
        )

        @Flag(name: .short, help: "Read-only: every level read-only.")
        var readOnly = false
        @Option(name: .short, help: ArgumentHelp("Format of BASE.", valueName: "format"))
        var format: ImageFormat = .ploop1
        @Option(name: .short, help: ArgumentHelp("Device to use (/dev/ploopN).", valueName: "device"))
        var device: String?
        @Option(name: .short, help: ArgumentHelp("Also mount the file system at this directory.", valueName: "mount-point"))
        var mountPoint: String?
        @Option(name: .short, help: ArgumentHelp("File system type for -m (default: what the partition holds; ext4 for images).", valueName: "type"))
        var type: String?
        var typeGiven: String? { type }
        @Flag(name: .customShort("F"), help: "With -m and a disk: check the file system (e2fsck -p) before mounting it.")
        var fsck = false
        @Option(name: .short, help: ArgumentHelp("Mount options for -m.", valueName: "options"))
        var options: String?
        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("Cluster size in sectors of a lone raw image.", valueName: "blocksize"))
        var blocksize: String?
        @OptionGroup var backend: BackendOptions
        @Flag(help: "Print the result as JSON.")
        var json = false
        @Option(name: [.customShort("u"), .customLong("uuid")], help: ArgumentHelp("With a disk: mount up to this snapshot (read-only).", valueName: "GUID"))
        var uuid: String?
        @Argument(help: ArgumentHelp("DiskDescriptor.xml (or its folder), or BASE [DELTA...], base first.", valueName: "image"))
        var images: [String] = []

        func validate() throws {
            if images.isEmpty { throw ValidationError("give the disk (DiskDescriptor.xml) or the base image and any deltas: ploop mount BASE [DELTA...]") }
            if let u = uuid { _ = try parseGUID(u) }
            if let d = device, DeviceName.canonical(d) == nil { throw ValidationError("\(d) is not a ploop device name (/dev/ploopN, or /dev/mapper/ploopN on dm-ploop)") }
            _ = try ClusterOption.parse(blocksize)
        }

        func run() throws {
            if images.count == 1, Disk.descriptorPath(for: images[0]) != nil {
                let fs = mountPoint.map { DiskCommands.FileSystemMount(directory: $0, type: typeGiven, options: options, fsck: fsck) }
                try DiskCommands.mount(images[0], uuid: uuid, readOnly: readOnly, device: device, fileSystem: fs, backend: backend, json: json)
                return
            }
            if uuid != nil { throw CommandFailure("-u names a snapshot of a disk: give DiskDescriptor.xml", code: ExitCodes.param) }
            let paths = images.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
            for p in paths { _ = try ImagePath.open(p, write: false) }
            let be = try backend.backend.resolve()
            if let m = mountPoint {
                var isDir: ObjCBool = false
                guard FileManager.default.fileExists(atPath: m, isDirectory: &isDir), isDir.boolValue else {
                    throw CommandFailure("mount point \(m) is not a directory", code: ExitCodes.mount)
                }
            }
            // An image a running device holds is not a crash's leftover: refuse it before the
            // mount-time check would take its in-use mark for one (the kernel driver takes no lock).
            let held = ((try? be.list()) ?? []).flatMap { d in d.levels.compactMap { l in PathInfo.identity(l.path).map { ($0, d.device) } } }
            for p in paths {
                guard let id = PathInfo.identity(p), let (_, dev) = held.first(where: { $0.0 == id }) else { continue }
                throw CommandFailure("\(p) is in use by \(dev): unmount it first ('ploop umount -d \(dev)')", code: ExitCodes.inUse)
            }
            try DirtyImages.repair(paths, baseFormat: format)
            let dev = try be.mount(MountRequest(images: paths, baseFormat: format, readOnly: readOnly, device: device, clusterSectors: try ClusterOption.parse(blocksize)))
            if let m = mountPoint {
                // Partition 1 where the device has a GPT (a disk ploop init -t made), else the whole device.
                let vol = Volume(device: dev, backend: be, clusterSectors: UInt64(try ClusterOption.parse(blocksize) ?? PloopSpec.defaultClusterSectors))
                do {
                    _ = try vol.mount(at: m, type: type ?? "ext4", options: options.map { [$0] } ?? [], fsck: false, readOnly: readOnly)
                } catch {
                    try? be.umount(dev)
                    throw error
                }
            }
            if json {
                print(try Output.json(try be.info(dev)))
            } else {
                print(dev)
            }
        }
    }

    struct Umount: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Stop a ploop device (unmounting its file system first).",
            discussion: """
                Flushes, clears the in-use mark of the top image and releases the device. A device \
                whose daemon died is cleaned up (its images keep the in-use mark; the next mount \
                checks them).

                While processes hold the device open (a program writing to it raw), umount waits \
                for them to let go, up to 60 seconds (PLOOP_UMOUNT_TIMEOUT), then refuses and \
                names them (exit 17), as the kernel driver refuses to stop an open device.

                Examples (from the manual):
                  ploop umount -d /dev/ploop0
                  ploop umount -m /mnt
                  ploop umount /vz/private/101/root.hdd/DiskDescriptor.xml
                """
        )

        @Option(name: .short, help: ArgumentHelp("The device.", valueName: "device"))
        var device: String?
        @Option(name: .short, help: ArgumentHelp("The mount point of its file system.", valueName: "mount-point"))
        var mountPoint: String?
        @OptionGroup var backend: BackendOptions
        @Argument(help: ArgumentHelp("DiskDescriptor.xml (or its folder), or an image the device holds.", valueName: "disk"))
        var disk: String?

        func validate() throws {
            if [device != nil, mountPoint != nil, disk != nil].filter({ $0 }).count != 1 {
                throw ValidationError("give one of -d DEVICE, -m MOUNT_POINT, or the disk (DiskDescriptor.xml) or an image")
            }
        }

        func run() throws {
            var dev = device
            if let disk { dev = try DiskCommands.umount(disk, backend: backend) }
            if let m = mountPoint {
                guard let d = Mounts.device(at: m) else { throw CommandFailure("nothing is mounted at \(m): nothing was unmounted", code: ExitCodes.notMounted) }
                guard let node = PloopNode(d) else { throw CommandFailure("\(m) is mounted from \(d), not from a ploop device: nothing was unmounted", code: ExitCodes.device) }
                dev = node.device
            }
            let be = try backend.backend.resolve()
            let name = try Self.knownDevice(dev!, backend: be)
            // Only now, with the name proven to be a device of ours, unmount what is mounted from
            // it and from its partitions (innermost first).
            for m in Mounts.mountPoints(ofDeviceOrPartitions: name).reversed() {
                do { try FileSystem.umount(m) } catch { throw CommandFailure(error.description, code: error.code) }
            }
            try be.umount(name)
        }

        /// `device` as the backend knows it (running, or dead but with its state kept), or a
        /// refusal that touches nothing: a name that is not a ploop device, or one that is not ours.
        static func knownDevice(_ device: String, backend be: any DeviceBackend) throws -> String {
            guard let name = DeviceName.canonical(device) else {
                throw CommandFailure("\(device) is not a ploop device name (/dev/ploopN, or /dev/mapper/ploopN on dm-ploop): nothing was unmounted", code: ExitCodes.device)
            }
            let known = try be.list()
            guard known.contains(where: { $0.device == name }) else {
                throw CommandFailure("no ploop device \(name) (see 'ploop list'): nothing was unmounted", code: ExitCodes.device)
            }
            return name
        }
    }

    struct Snapshot: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Take a snapshot of a disk (DiskDescriptor.xml) or of a running device: a new empty delta becomes the top.",
            discussion: """
                NEWDELTA must not exist. Every write made before the snapshot stays in the old top \
                (now read-only); later writes go to NEWDELTA.

                With a disk (DiskDescriptor.xml or its folder) instead: the current top becomes snapshot \
                GUID (-u; random when not given) and a new empty delta <base file>.{guid} becomes the top, \
                offline, or online when a device runs the disk (its file system is synced first).

                Examples (from the manual and the original's usage):
                  ploop snapshot -d /dev/ploop0 root.hdd.1
                  ploop snapshot -u {11111111-1111-4111-8111-111111111111} DiskDescriptor.xml
                """
        )

        @Option(name: .short, help: ArgumentHelp("The device.", valueName: "device"))
        var device: String?
        @Option(name: [.customShort("u"), .customLong("uuid")], help: ArgumentHelp("With a disk: the new snapshot's GUID.", valueName: "GUID"))
        var uuid: String?
        @OptionGroup var backend: BackendOptions
        @Argument(help: "The new delta file (with -d), or DiskDescriptor.xml.")
        var delta: String

        func validate() throws {
            if let u = uuid { _ = try parseGUID(u) }
            if device != nil && uuid != nil { throw ValidationError("-u names a snapshot of a disk: give DiskDescriptor.xml instead of -d") }
        }

        func run() throws {
            guard let device else {
                try DiskCommands.snapshot(delta, uuid: uuid, backend: backend)
                return
            }
            let be = try backend.backend.resolve()
            let path = URL(fileURLWithPath: delta).standardizedFileURL.path
            FileSystem.syncAll(on: device)
            try be.snapshot(device, newDelta: path)
            say("Snapshot of \(device): new top delta \(path)")
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List ploop devices: backend, levels and images, size, state.",
            discussion: """
                Example:
                  ploop list --json
                """
        )

        @Flag(help: "Print as JSON.")
        var json = false
        @OptionGroup var backend: BackendOptions

        func run() throws {
            let be = try backend.backend.resolve()
            let devices = try be.list()
            if json {
                print(try Output.json(devices))
                return
            }
            if devices.isEmpty { print("no ploop devices") }
            for d in devices {
                let state = d.running ? d.state.description : "DEAD (daemon gone: ploop umount -d \(d.device))"
                print("\(d.device)  \(d.backend)  \(Output.size(d.sizeBytes))  \(Output.size(UInt64(d.clusterBytes))) clusters  \(state)")
                if let top = d.levels.last?.path, let dd = DiskLookup.descriptor(naming: top) { print("  disk \(dd)") }
                for l in d.levels {
                    print("  \(l.level)  \(l.readOnly ? "ro" : "rw")  \(l.format.rawValue)  \(l.path)")
                }
                if let log = d.log { print("  log \(log)") }
            }
        }
    }

    /// The daemon mode of the binary (started by mount; not for users).
    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "__serve", abstract: "Serve a simulated device (internal).", shouldDisplay: false)

        @Option(help: "The daemon's launch description (JSON, written by mount).")
        var launch: String

        func run() throws {
            let l: Wire.Launch
            do { l = try Wire.Launch.decode(launch) } catch { throw CommandFailure("__serve --launch: \(error)", code: ExitCodes.param) }
            // Signals go to the daemon's signal thread only.
            Signals.blockTermination()
            Signals.ignoreBrokenPipe()
            // Keep only stdin/out/err and the readiness pipe: whatever else the starter had open
            // (its caller's pipes) must not stay open for the daemon's lifetime.
            Signals.closeDescriptors(from: max(l.readyFD, 2) + 1)
            var ready = l.readyFD >= 0 ? Channel(l.readyFD, name: "the readiness pipe", owning: true) : nil
            func report(_ line: Wire.Ready) throws { try ready?.writeAll(Array(try JSONEncoder().encode(line)) + [UInt8(ascii: "\n")]) }
            let daemon: SimulatorDaemon
            do {
                daemon = try SimulatorDaemon(.init(index: l.index, request: l.request, threads: l.threads, paths: RuntimePaths(root: l.runDir)))
            } catch {
                let e = (error as? DeviceError) ?? .unavailable("\(error)")
                try report(Wire.Ready(error: e))
                throw CommandFailure(e)
            }
            try report(Wire.Ready())
            ready = nil  // closed: the starter has its answer
            daemon.run()
        }
    }
}

/// The original's mount-time check: an image marked in use was left by a crash; check and repair it
/// (dropping the mark) before it is used, unless a running device holds it.
enum DirtyImages {
    static func repair(_ paths: [String], baseFormat: ImageFormat) throws {
        for (i, p) in paths.enumerated() {
            if i == 0 && baseFormat == .raw { continue }
            guard let info = try? ImageInfo.read(path: p), info.format == .ploop1 else { continue }
            guard info.inUse else {
                // A device serving a BAT with shared blocks or entries past the end would hand
                // one cluster's data to another: refuse what 'check' calls corrupt.
                try Checker.validate(try ImagePath.open(p, write: false))
                continue
            }
            let r: Checker.Report
            do { r = try Checker.repairStaleMark(path: p) } catch {
                if case .corrupt(_, let why) = error {
                    throw CommandFailure("\(p) needs repair before it can be mounted: run 'ploop check -f \(p)' (\(why))", code: ExitCodes.format)
                }
                throw CommandFailure(error)
            }
            let fixed = r.findings.filter { $0.action == .fixed }.map(\.message)
            Console.write(to: .error, "ploop: \(p) was not closed cleanly; checked: \(fixed.joined(separator: "; "))\n")
        }
    }
}

/// The DiskDescriptor.xml (beside an image) that names it, if any: read without its lock, only to
/// tell the user which disk a device runs.
enum DiskLookup {
    static func descriptor(naming image: String) -> String? {
        let folder = (image as NSString).deletingLastPathComponent
        guard let dd = Disk.descriptorPath(for: folder), let data = FileManager.default.contents(atPath: dd),
            let d = try? DiskDescriptor.parse(data, path: dd), let id = PathInfo.identity(image)
        else { return nil }
        return d.images.contains { PathInfo.identity(Disk.resolve($0.file, in: folder)) == id } ? dd : nil
    }
}
