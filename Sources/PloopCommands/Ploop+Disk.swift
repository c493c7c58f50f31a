import ArgumentParser
import Foundation
import PloopDevice
import PloopDisk
import PloopFormat
import PloopImage
import PloopVolume
import PloopSystem

/// `-u GUID`, with or without braces, in any case.
func parseGUID(_ text: String) throws -> GUID {
    guard let g = GUID(parsing: text) else { throw ValidationError(DiskError.badGUID(text).description) }
    return g
}

/// The running device of a disk: the one whose top image is the disk's top (nil: not running).
/// `anyLevel` also finds a device that holds any image of the chain.
enum DiskDevices {
    static func device(of disk: Disk, backend be: any DeviceBackend, anyLevel: Bool = false) -> DeviceInfo? {
        let chain = Set(disk.chainPaths().compactMap(PathInfo.identity))
        let top = PathInfo.identity(disk.path(of: disk.descriptor.topGUID))
        return ((try? be.list()) ?? []).first { d in
            if anyLevel { return d.levels.contains { PathInfo.identity($0.path).map(chain.contains) ?? false } }
            return d.levels.last.flatMap { PathInfo.identity($0.path) } == top
        }
    }

    /// Refuses an offline-only operation on a disk a device runs.
    static func requireOffline(_ disk: Disk) throws {
        guard let be = disk.backend else { return }
        if let d = device(of: disk, backend: be, anyLevel: true) {
            throw CommandFailure(DiskError.mounted(disk.descriptorPath, device: d.device))
        }
    }

    /// The disk, opened and locked, for an operation that must not run while a device runs it.
    static func openOffline(_ argument: String, backend: BackendOptions) throws -> Disk {
        let d = try open(argument, backend: backend)
        try requireOffline(d)
        return d
    }

    /// The disk and the device that runs it from its top (nil: not running), for an operation
    /// that works both ways. A device that holds only part of the chain is refused.
    static func openOnline(_ argument: String, backend: BackendOptions) throws -> (Disk, device: String?) {
        let d = try open(argument, backend: backend)
        guard let be = d.backend else { return (d, nil) }
        if let running = device(of: d, backend: be) { return (d, running.device) }
        if let held = device(of: d, backend: be, anyLevel: true) {
            throw CommandFailure("\(held.device) runs part of the disk \(d.descriptorPath) (not from its top): unmount it first", code: ExitCodes.inUse)
        }
        return (d, nil)
    }

    /// The disk an argument names, opened and locked, or a refusal that says what to give. The
    /// backend (the default one when not given) lets the open recover an interrupted online
    /// operation by asking its device.
    static func open(_ argument: String, backend: BackendOptions? = nil) throws -> Disk {
        guard let dd = Disk.descriptorPath(for: argument) else {
            throw CommandFailure(DiskError.noDescriptor(argument))
        }
        let be = try? (backend?.backend ?? .auto).resolve()
        return try Disk.open(dd, backend: be) { Console.write(to: .error, "ploop: \($0)\n") }
    }
}

extension Ploop {
    struct SnapshotList: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "snapshot-list",
            abstract: "List a disk's snapshots: parent, current mark, GUID, file.",
            discussion: """
                Columns (-o, comma-separated, any order): uuid, parent_uuid, current, fname; the default \
                is parent_uuid,current,uuid,fname. Rows are base first; -u GUID lists that snapshot and \
                its ancestors (it first); -s hides the top (its parent is then current).

                Example (from the original's usage):
                  ploop snapshot-list -o uuid,fname /vz/private/101/root.hdd/DiskDescriptor.xml
                """
        )

        @Flag(name: [.customShort("H"), .customLong("no-header")], help: "Print no header line.")
        var noHeader = false
        @Option(name: [.customShort("o"), .customLong("output")], help: ArgumentHelp("Fields to print.", valueName: "fields"))
        var output: String?
        @Flag(name: [.customShort("s"), .customLong("snapshot")], help: "Hide the top delta (the running state), list snapshots only.")
        var snapshotsOnly = false
        @Option(name: [.customShort("u"), .customLong("uuid"), .customLong("id")], help: ArgumentHelp("List this snapshot and its ancestors.", valueName: "GUID"))
        var uuid: String?
        @Flag(help: "Print as JSON.")
        var json = false
        @Argument(help: "DiskDescriptor.xml, or the folder holding it.")
        var disk: String

        enum Field: String { case uuid, parent_uuid, current, fname }

        static func fields(_ text: String?) throws -> [Field] {
            guard let text else { return [.parent_uuid, .current, .uuid, .fname] }
            return try text.split(separator: ",", omittingEmptySubsequences: false).map { f in
                guard let field = Field(rawValue: f.trimmingCharacters(in: .whitespaces).lowercased()) else {
                    throw ValidationError("Unknown field: \(f) (fields: uuid, parent_uuid, current, fname)")
                }
                return field
            }
        }

        func validate() throws {
            _ = try Self.fields(output)
            if let u = uuid { _ = try parseGUID(u) }
        }

        /// The original's layout: GUID columns 38 wide, C 1, FNAME 32, one space between; the header
        /// ends with a space, rows end with their last column bare.
        static func render(_ rows: [Disk.ListRow], fields: [Field], header: Bool) -> String {
            func width(_ f: Field) -> Int { f == .current ? 1 : f == .fname ? 32 : 38 }
            func title(_ f: Field) -> String { f == .current ? "C" : f == .fname ? "FNAME" : f == .uuid ? "UUID" : "PARENT_UUID" }
            func pad(_ s: String, _ w: Int) -> String { s.count >= w ? s : s + String(repeating: " ", count: w - s.count) }
            var out = ""
            if header { out += fields.map { pad(title($0), width($0)) + " " }.joined() + "\n" }
            for r in rows {
                let cells = fields.map { f -> String in
                    switch f {
                    case .uuid: r.uuid
                    case .parent_uuid: r.parentUUID
                    case .current: r.current ? "*" : " "
                    case .fname: r.fname
                    }
                }
                out += cells.enumerated().map { i, c in i == cells.count - 1 ? c : pad(c, width(fields[i])) }.joined(separator: " ") + "\n"
            }
            return out
        }

        func run() throws {
            let d = try DiskDevices.open(disk)
            let rows = try d.listRows(from: try uuid.map(parseGUID), hideTop: snapshotsOnly)
            if json {
                print(try Output.json(rows))
                return
            }
            Console.write(to: .output, Self.render(rows, fields: try Self.fields(output), header: !noHeader))
        }
    }

    struct SnapshotDelete: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "snapshot-delete",
            abstract: "Delete a snapshot of a disk (offline or online).",
            discussion: """
                The snapshot's one child is merged into the snapshot's file, which then carries the child's \
                GUID; deleting the top delta drops what was written since the last snapshot (its parent \
                becomes the top). The base of a disk with one image cannot be deleted. While a device runs \
                the disk, the merge runs on the device (the file system stays mounted) and the top cannot \
                be deleted (as the original).

                Example (from the original's usage):
                  ploop snapshot-delete -u {11111111-1111-4111-8111-111111111111} DiskDescriptor.xml
                """
        )

        @Option(name: [.customShort("u"), .customLong("uuid")], help: ArgumentHelp("The snapshot.", valueName: "GUID"))
        var uuid: String
        @OptionGroup var backend: BackendOptions
        @Argument(help: "DiskDescriptor.xml, or the folder holding it.")
        var disk: String

        func validate() throws { _ = try parseGUID(uuid) }

        func run() throws {
            let (d, device) = try DiskDevices.openOnline(disk, backend: backend)
            let g = try parseGUID(uuid)
            if d.finishedOperation == "snapshot-delete \(g.key)" {
                say("ploop snapshot \(g): the interrupted delete is finished")
                return
            }
            let progress = ProgressLine("merging")
            let merged = try d.deleteSnapshot(g, device: device, progress: progress.update)
            try DiskCommands.mergeTemporaries(d, device: device)
            print(merged ? "ploop snapshot merged" : "ploop snapshot \(g) has been successfully deleted")
        }
    }

    struct SnapshotMerge: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "snapshot-merge",
            abstract: "Merge a snapshot into its parent (offline or online).",
            discussion: """
                Without -u the top delta is merged into its parent; -u GUID merges that snapshot into its \
                parent, whose file then carries GUID; -A merges the whole chain into the base. With -n \
                the result is written to a new file DELTA instead of the parent's (offline only). While a \
                device runs the disk, the merge runs on the device, as 'ploop merge -d' does.

                Example (from the original's usage):
                  ploop snapshot-merge -u {22222222-2222-4222-8222-222222222222} DiskDescriptor.xml
                """
        )

        @Option(name: [.customShort("u"), .customLong("uuid")], help: ArgumentHelp("The snapshot (default: the top).", valueName: "GUID"))
        var uuid: String?
        @Flag(name: [.customShort("A")], help: "Merge every snapshot into the base.")
        var all = false
        @Option(name: [.customShort("n"), .customLong("new-delta")], help: ArgumentHelp("Write the result to this new file.", valueName: "DELTA"))
        var newDelta: String?
        @OptionGroup var backend: BackendOptions
        @Argument(help: "DiskDescriptor.xml, or the folder holding it.")
        var disk: String

        func validate() throws {
            if let u = uuid { _ = try parseGUID(u) }
            if all && uuid != nil { throw ValidationError("Options -u and -A can't be used together") }
        }

        func run() throws {
            let (d, device) = try DiskDevices.openOnline(disk, backend: backend)
            let op = all ? "snapshot-merge -A" : "snapshot-merge \(try uuid.map(parseGUID)?.key ?? "top")"
            if d.finishedOperation == op {
                say("ploop snapshot merged (an interrupted merge was finished)")
                return
            }
            let progress = ProgressLine("merging")
            try d.mergeSnapshot(try uuid.map(parseGUID), all: all, newDelta: newDelta, device: device, progress: progress.update)
            say("ploop snapshot merged")
        }
    }

    struct SnapshotSwitch: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "snapshot-switch",
            abstract: "Go back to a snapshot (offline): the top delta is dropped, a new empty one starts on GUID.",
            discussion: """
                What was written since the last snapshot is lost (the top delta's file is removed, or with \
                -D kept on disk but no longer part of the disk); the other snapshots stay.

                Example (from the original's usage):
                  ploop snapshot-switch -u {11111111-1111-4111-8111-111111111111} DiskDescriptor.xml
                """
        )

        @Option(name: [.customShort("u"), .customLong("uuid")], help: ArgumentHelp("The snapshot to go back to.", valueName: "GUID"))
        var uuid: String
        @Flag(name: [.customShort("D")], help: "Keep the old top delta's file on disk (out of the descriptor).")
        var keepOldTop = false
        @OptionGroup var backend: BackendOptions
        @Argument(help: "DiskDescriptor.xml, or the folder holding it.")
        var disk: String

        func validate() throws { _ = try parseGUID(uuid) }

        func run() throws {
            let d = try DiskDevices.openOffline(disk, backend: backend)
            if d.finishedOperation == "snapshot-switch \(try parseGUID(uuid).key)" {
                say("ploop snapshot has been successfully switched (an interrupted switch was finished)")
                return
            }
            try d.switchSnapshot(try parseGUID(uuid), keepOldTop: keepOldTop)
            say("ploop snapshot has been successfully switched")
        }
    }

    struct RestoreDescriptor: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "restore-descriptor",
            abstract: "Write the DiskDescriptor.xml that init would have written for an image.",
            discussion: """
                IMAGE is a path (relative to the current folder); DIR must not hold a descriptor yet. A raw \
                image needs -f raw (and -b for its cluster size, default 2048).

                Example (from the original's usage):
                  ploop restore-descriptor /vz/private/101/root.hdd /vz/private/101/root.hdd/root.hds
                """
        )

        @Option(name: .short, help: ArgumentHelp("Image format.", valueName: "format"))
        var format: ImageFormat?
        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("Cluster size in sectors (raw images).", valueName: "blocksize"))
        var blocksize: String?
        @Argument(help: "The folder to write DiskDescriptor.xml in.")
        var folder: String
        @Argument(help: "The base image.")
        var image: String

        func validate() throws { _ = try ClusterOption.parse(blocksize) }

        func run() throws {
            let dd = try Disk.restoreDescriptor(folder: folder, image: image, format: format, blocksize: try ClusterOption.parse(blocksize))
            say("Storing \(dd)")
        }
    }
}

/// The descriptor forms of the manual's commands (snapshot, mount, umount, check, info, grow).
enum DiskCommands {
    static func snapshot(_ argument: String, uuid: String?, backend: BackendOptions) throws {
        let d = try DiskDevices.open(argument, backend: backend)
        let guid = try uuid.map(parseGUID)
        if let guid, d.finishedOperation == "snapshot \(guid.key)" {
            say("ploop snapshot \(guid) has been successfully created (an interrupted snapshot was finished)")
            return
        }
        let g = try take(d, guid: guid, temporary: false)
        say("ploop snapshot \(g) has been successfully created")
    }

    /// A snapshot of an open disk, online when a device runs it from its top; temporary
    /// snapshots nothing holds any more are merged back first, as the original does.
    static func take(_ d: Disk, guid: GUID?, temporary: Bool) throws -> GUID {
        let be = d.backend
        let running = be.flatMap { DiskDevices.device(of: d, backend: $0) }
        if running == nil, let be, let held = DiskDevices.device(of: d, backend: be, anyLevel: true) {
            throw CommandFailure("\(held.device) runs part of the disk \(d.descriptorPath) (not from its top): unmount it first", code: ExitCodes.inUse)
        }
        try mergeTemporaries(d, device: running?.device)
        let (g, _) = try d.snapshot(guid, temporary: temporary, device: running?.device) { (file) throws(DiskError) in
            guard let dev = running, let be else { return try d.createEmptyDeltaForSnapshot(file) }
            // A mounted file system's cached writes belong in the snapshot.
            FileSystem.syncAll(on: dev.device)
            // The device's own error, so its exit code is the device's (40 for a daemon that
            // died under it, 17 for a busy one), not a parameter's.
            do { try be.snapshot(dev.device, newDelta: file) } catch let e as DeviceError { throw .device(dev.device, e) } catch { throw .refused("\(error)") }
        }
        return g
    }

    /// Merges back the disk's temporary snapshots that no device of their own runs.
    static func mergeTemporaries(_ d: Disk, device: String?) throws {
        guard d.descriptor.shots.contains(where: \.temporary) else { return }
        let devices = ((try? d.backend?.list()) ?? nil) ?? []
        _ = try d.mergeTemporarySnapshots(device: device, held: { g in
            let file = PathInfo.identity(d.path(of: g))
            return devices.contains { $0.device != device && $0.levels.last.flatMap { PathInfo.identity($0.path) } == file }
        })
    }

    static func mount(_ argument: String, uuid: String?, readOnly: Bool, device: String?, fileSystem: FileSystemMount?, backend: BackendOptions, json: Bool) throws {
        // A mount point that cannot be used is refused before the device starts.
        if let fs = fileSystem { try Volume.checkMountPoint(fs.directory) }
        let d = try DiskDevices.open(argument, backend: backend)
        // Without a backend the open could not have one; resolving again says why.
        let be = try d.backend ?? backend.backend.resolve()
        if let running = DiskDevices.device(of: d, backend: be, anyLevel: true) {
            throw CommandFailure("the disk \(d.descriptorPath) is running on \(running.device) already", code: ExitCodes.inUse)
        }
        let g = try uuid.map(parseGUID)
        if let g, d.descriptor.shot(g) == nil { throw CommandFailure(DiskError.unknownGUID(d.descriptorPath, g)) }
        // A snapshot below the top is mounted read-only, as the original.
        let ro = readOnly || (g != nil && g != d.descriptor.topGUID)
        let paths = d.chainPaths(from: g)
        try DirtyImages.repair(paths, baseFormat: d.baseFormat)
        let dev = try be.mount(MountRequest(images: paths, baseFormat: d.baseFormat, readOnly: ro, device: device, clusterSectors: d.descriptor.blocksize))
        // /dev/ploopNp1 as soon as the device runs (a disk without a table has none).
        if fileSystem == nil { _ = try? Volume(device: dev, backend: be, clusterSectors: UInt64(d.descriptor.blocksize)).layout() }
        if let fs = fileSystem {
            // Nothing is left running when the file system cannot be mounted.
            let vol = Volume(device: dev, backend: be, clusterSectors: UInt64(d.descriptor.blocksize))
            do {
                _ = try vol.mount(at: fs.directory, type: fs.type, options: fs.options.map { [$0] } ?? [], fsck: fs.fsck, readOnly: ro)
            } catch {
                try? be.umount(dev)
                throw error
            }
        }
        if json { print(try Output.json(try be.info(dev))) } else { print(dev) }
    }

    static func umount(_ argument: String, backend: BackendOptions) throws -> String {
        let be = try backend.backend.resolve()
        if let dd = Disk.descriptorPath(for: argument) {
            // With the backend, so an interrupted online operation is recovered, not refused.
            let d = try Disk.open(dd, backend: be)
            guard let dev = DiskDevices.device(of: d, backend: be, anyLevel: true) else {
                throw CommandFailure(DiskError.notMounted(d.descriptorPath))
            }
            return dev.device
        }
        // An image: the device that holds it at any level.
        guard let id = PathInfo.identity(argument) else { throw CommandFailure("\(argument): no such file (give a device with -d, a mount point with -m, a disk or an image)", code: ExitCodes.open) }
        guard let dev = ((try? be.list()) ?? []).first(where: { $0.levels.contains { PathInfo.identity($0.path) == id } }) else {
            throw CommandFailure("no ploop device holds \(argument)", code: ExitCodes.notMounted)
        }
        return dev.device
    }

    /// Checks every delta of the chain. Read-only (`-r`), the disk is opened as it is: an operation
    /// a failure or a crash left unfinished is reported (exit 17) instead of finished, and the
    /// chain the descriptor names now is checked.
    static func check(_ argument: String, uuid: String?, options: Checker.Options, silent: Bool, json: Bool, hardForce: Bool) throws {
        let d: Disk
        var pending: String?
        if options.readOnly {
            guard let dd = Disk.descriptorPath(for: argument) else { throw CommandFailure(DiskError.noDescriptor(argument)) }
            d = try Disk.openAsIs(dd)
            pending = d.pendingOperation()
            if let pending {
                Console.write(to: .error, "ploop: \(d.descriptorPath): \(pending); run `ploop check` without -r, or any command on the disk, to finish it\n")
            }
        } else {
            d = try DiskDevices.open(argument)
        }
        let g = try uuid.map(parseGUID)
        if let g, d.descriptor.shot(g) == nil { throw CommandFailure(DiskError.unknownGUID(d.descriptorPath, g)) }
        var worst: Int32 = 0
        var reports: [Ploop.JSONReport] = []
        for (i, p) in d.chainPaths(from: g).enumerated() {
            if i == 0 && d.baseFormat == .raw { continue }
            if pending != nil && PathInfo.kind(p) != .regular { continue }  // not made yet: finishing makes it
            let progress = ProgressLine("checking").reporter
            let r = try Checker.check(path: p, options: options, progress: progress)
            reports.append(Ploop.JSONReport(r))
            if !silent && !json { Ploop.Check.show(r, image: p, hardForce: hardForce) }
            if r.exitCode != 0 && worst == 0 { worst = r.exitCode }
        }
        if json { print(try Output.json(reports)) }
        if worst != 0 { throw CommandFailure("", code: worst) }
        if pending != nil { throw CommandFailure("", code: ExitCodes.busy) }
    }

    struct InfoReport: Encodable {
        var descriptor: String
        var sizeSectors: UInt64
        var blocksize: UInt32
        var fmtVersion: Int?
        var top: String
        var images: [String]
        var device: String?
        /// Plain `info` only: the file system's usage (nil for a disk without one).
        var fileSystem: FileSystem.Usage?
    }

    static func info(_ argument: String, spec: Bool, device showDevice: Bool, json: Bool, backend: BackendOptions) throws {
        let d = try DiskDevices.open(argument, backend: backend)
        let topPath = d.path(of: d.descriptor.topGUID)
        let top = try ImageInfo.read(path: topPath)
        let dev = d.backend.flatMap { DiskDevices.device(of: d, backend: $0) }?.device
        // Plain info reports the file system's usage, as the original (a disk without one: the spec).
        let usage = spec || showDevice ? nil : try usage(d)
        if json {
            print(try Output.json(InfoReport(
                descriptor: d.descriptorPath, sizeSectors: d.descriptor.diskSizeSectors, blocksize: d.descriptor.blocksize,
                fmtVersion: top.version, top: topPath, images: d.chainPaths(), device: dev, fileSystem: usage)))
            return
        }
        if let usage {
            printUsage(usage)
            return
        }
        if spec || !showDevice {
            print("size:\t\t\(d.descriptor.diskSizeSectors)")
            print("blocksize:\t\(d.descriptor.blocksize)")
            print("fmt_version:\t\(top.version ?? 0)")
        }
        if showDevice {
            print("device:\t\t\(dev ?? "")")
            print("partition:\t\(dev.map { PathInfo.kind($0 + "p1") == .blockDevice ? $0 + "p1" : "" } ?? "")")
        }
    }

    /// Grows a disk (online when a device runs it); returns what `grow --json` reports.
    static func grow(_ argument: String, sectors: UInt64, backend: BackendOptions) throws -> Ploop.Grow.Grown {
        let d = try DiskDevices.open(argument, backend: backend)
        if let be = d.backend, let dev = DiskDevices.device(of: d, backend: be) {
            try d.growOnline(device: dev.device, backend: be, toSectors: sectors)
            return .init(target: argument, descriptor: d.descriptorPath, device: dev.device, sizeBytes: d.descriptor.diskSizeSectors * 512)
        }
        try d.grow(toSectors: sectors)
        return .init(target: argument, descriptor: d.descriptorPath, sizeBytes: d.descriptor.diskSizeSectors * 512)
    }
}

extension Ploop {
    struct TSnapshot: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "tsnapshot",
            abstract: "Take a temporary snapshot and run it read-only on a device of its own (for backups).",
            discussion: """
                The disk's top becomes snapshot GUID, marked <Temporary/>, and a new empty top takes the \
                writes (online when a device runs the disk). The chain up to GUID is then started \
                read-only on a new device, printed on stdout, for a backup tool to read. When that device \
                is unmounted ('ploop umount -d DEV'), the next snapshot, tsnapshot or snapshot-delete \
                merges the temporary snapshot back, as the original does. If the read-only device cannot \
                be started, the snapshot is merged back at once. COMPONENT names the holder (the original \
                keeps it in the device's cookie); it is printed with the device. -m DIR mounts the \
                snapshot's file system there, read-only (ext4 without replaying its journal: the snapshot \
                is taken after a syncfs, not after an unmount); 'ploop umount -d DEV' unmounts it too.

                Example (from the original's usage):
                  ploop tsnapshot -u {11111111-1111-4111-8111-111111111111} -c backup DiskDescriptor.xml
                """
        )

        @Option(name: [.customShort("u"), .customLong("uuid")], help: ArgumentHelp("The temporary snapshot's GUID.", valueName: "GUID"))
        var uuid: String
        @Option(name: [.customShort("c"), .customLong("component")], help: ArgumentHelp("Who holds the snapshot (a name, e.g. the backup tool's).", valueName: "COMPONENT"))
        var component: String
        @Option(name: [.customShort("m")], help: ArgumentHelp("Mount the snapshot's file system here, read-only.", valueName: "DIR"))
        var mountPoint: String?
        @Flag(help: "Print the device and snapshot as JSON.")
        var json = false
        @OptionGroup var backend: BackendOptions
        @Argument(help: "DiskDescriptor.xml, or the folder holding it.")
        var disk: String

        func validate() throws {
            _ = try parseGUID(uuid)
            if component.isEmpty || component.utf8.count > 63 || component.contains(where: { $0.isNewline || $0 == "/" }) {
                throw ValidationError("-c \(component): a component is a name of 1 to 63 bytes, without '/' or line breaks")
            }
        }

        func run() throws {
            if let m = mountPoint { try Volume.checkMountPoint(m) }
            let d = try DiskDevices.open(disk, backend: backend)
            // Without a backend the open could not have one; resolving again says why.
            let be = try d.backend ?? backend.backend.resolve()
            // A file system to mount must be there before any snapshot is taken.
            if let m = mountPoint, try !DiskCommands.hasFileSystem(d, be) {
                throw CommandFailure("-m \(m): \(d.descriptorPath) has no file system to mount (it was made with -t none); leave -m out", code: ExitCodes.param)
            }
            let g = try DiskCommands.take(d, guid: try parseGUID(uuid), temporary: true)
            let paths = d.chainPaths(from: g)
            let request = MountRequest(images: paths, baseFormat: d.baseFormat, readOnly: true, device: nil, clusterSectors: d.descriptor.blocksize)
            // As the original: the snapshot goes back at once when it cannot be started or mounted.
            func mergeBack() {
                let running = DiskDevices.device(of: d, backend: be)?.device
                try? d.mergeSnapshot(nil, all: false, newDelta: nil, device: running)
            }
            let dev: String
            do { dev = try be.mount(request) } catch {
                mergeBack()
                throw CommandFailure("the temporary snapshot \(g) could not be started read-only (\(error)); it was merged back", code: ExitCodes.deviceIoctl)
            }
            if let m = mountPoint {
                let vol = Volume(device: dev, backend: be, clusterSectors: UInt64(d.descriptor.blocksize))
                do {
                    let type = try FileSystem.superblock(vol.layout().node).journaled ? ["noload"] : []
                    _ = try vol.mount(at: m, type: nil, options: type, fsck: false, readOnly: true)
                } catch {
                    try? be.umount(dev)
                    mergeBack()
                    throw CommandFailure("the temporary snapshot \(g) could not be mounted at \(m) (\(error)); it was merged back", code: ExitCodes.mount)
                }
            }
            if json {
                print(try Output.json(["device": dev, "uuid": g.text, "component": component]))
            } else {
                say("ploop snapshot \(g) (temporary, for \(component)) has been successfully created")
                print(dev)
            }
        }
    }
}

extension Ploop {
    struct Convert: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Convert a disk's layout (raw, preallocated, expanded) or header version (offline).",
            discussion: """
                -v 2 lifts v1's limit (2 TiB of 32-bit sectors); -v 1 is refused for a disk or a block it \
                cannot hold (the original wraps those sizes silently). Each image is converted crash-safe: \
                the new BAT is staged in IMAGE.convert first; killed half way, the next command on the disk \
                (or 'ploop check' on the image) finishes it. Data clusters are not moved.

                -f changes the layout of a single-image disk (merge snapshots first: the original converts \
                only the first image and breaks the chain): preallocated gives every cluster its block in \
                place; expanded only records that new clusters are allocated as written (blocks stay); raw \
                and back build the new file beside the image (IMAGE.layout, sparse where the disk reads \
                nothing) and rename it over the image, journalled, so a kill leaves the old or the new disk \
                and the next command finishes. What the disk reads never changes.

                Examples (from the original's usage):
                  ploop convert -v 2 /vz/private/101/root.hdd/DiskDescriptor.xml
                  ploop convert -f preallocated /vz/private/101/root.hdd/DiskDescriptor.xml
                """
        )

        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("The header version to convert to: 1 or 2.", valueName: "version"))
        var version: String?
        @Option(name: .short, help: ArgumentHelp("The layout to convert to: raw, preallocated, expanded (ploop1).", valueName: "format"))
        var format: String?
        @OptionGroup var backend: BackendOptions
        @Argument(help: "DiskDescriptor.xml (or its folder), or one ploop1 image.")
        var disk: String

        func validate() throws {
            if let f = format {
                guard Offline.Layout(argument: f) != nil else { throw ValidationError("-f \(f): the layout is raw, preallocated or expanded (ploop1)") }
                if version != nil { throw ValidationError("give -f or -v, not both: convert the layout and the version in two runs") }
                return
            }
            guard let v = version else { throw ValidationError("give -f raw|preallocated|expanded or -v 1|2") }
            if Int(v).flatMap(FormatVersion.init(rawValue:)) == nil { throw ValidationError("-v \(v): the header version is 1 or 2") }
        }

        func run() throws {
            if let f = format {
                let target = Offline.Layout(argument: f)!
                guard Disk.descriptorPath(for: disk) != nil else {
                    throw CommandFailure("-f \(f) converts a disk: give its DiskDescriptor.xml or folder (for an image file, use 'ploop merge' or 'qemu-img convert')", code: ExitCodes.param)
                }
                let d = try DiskDevices.openOffline(disk, backend: backend)
                let progress = ProgressLine("converting")
                let changed = try d.convertLayout(to: target, version: DefaultVersion.detect(), progress: progress.update)
                print(changed ? "ploop image has been successfully converted" : "\(d.descriptorPath) is already \(target.rawValue)")
                return
            }
            let v = FormatVersion(rawValue: Int(version!)!)!
            guard Disk.descriptorPath(for: disk) != nil else {
                let changed = try Offline.convertVersion(path: disk, to: v)
                if let left = Offline.leftoverConversionFile(of: disk) {
                    Console.write(to: .error, "ploop: warning: cannot remove \(left) (the conversion is done); the next conversion removes it, or remove it by hand\n")
                }
                print(changed ? "ploop image has been successfully converted" : "\(disk) is already v\(v.rawValue)")
                return
            }
            let d = try DiskDevices.openOffline(disk, backend: backend)
            let done = try d.convertVersion(to: v)
            print(done.isEmpty ? "every image of \(d.descriptorPath) is already v\(v.rawValue)" : "ploop image has been successfully converted")
        }
    }
}

extension Ploop {
    struct Replace: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Replace an image of a disk with an equivalent file (offline).",
            discussion: """
                The image is chosen by GUID (-u), by level (-l, 0 is the base) or by its current file (-o). \
                NEWDELTA must be the same kind of image, of the same size and cluster size, and sound \
                ('ploop check' finds nothing fatal). Without -k the descriptor names NEWDELTA and the old \
                file stays where it is; with -k NEWDELTA is renamed over the old file.

                Example (from the original's usage):
                  ploop replace -u {11111111-1111-4111-8111-111111111111} -i /backup/root.hds DiskDescriptor.xml
                """
        )

        @Option(name: [.customShort("u"), .customLong("uuid")], help: ArgumentHelp("The image's GUID.", valueName: "GUID"))
        var uuid: String?
        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("The image's level (0 is the base).", valueName: "level"))
        var level: String?
        @Option(name: [.customShort("o")], help: ArgumentHelp("The image's current file.", valueName: "file"))
        var current: String?
        @Option(name: .short, help: ArgumentHelp("The new file.", valueName: "NEWDELTA"))
        var input: String
        @Flag(name: [.customShort("k"), .customLong("keep-name")], help: "Keep the file name: rename NEWDELTA to the current file.")
        var keepName = false
        @OptionGroup var backend: BackendOptions
        @Argument(help: "DiskDescriptor.xml, or the folder holding it.")
        var disk: String

        func validate() throws {
            if [uuid != nil, level != nil, current != nil].filter({ $0 }).count != 1 {
                throw ValidationError("give exactly one of -u GUID, -l LEVEL or -o FILE")
            }
            if let u = uuid { _ = try parseGUID(u) }
            if let l = level, Int(l) == nil || Int(l)! < 0 { throw ValidationError("-l \(l): a level is a number from 0 (the base)") }
        }

        func run() throws {
            let d = try DiskDevices.openOffline(disk, backend: backend)
            let selector: Disk.ImageSelector = try uuid.map { .guid(try parseGUID($0)) } ?? level.map { .level(Int($0)!) } ?? .file(current!)
            let g = try d.replace(selector, with: input, keepName: keepName)
            say("ploop image \(g) has been successfully replaced")
        }
    }
}
