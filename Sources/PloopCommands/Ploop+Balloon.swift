import ArgumentParser
import Foundation
import PloopBalloon
import PloopDevice
import PloopDisk
import PloopFormat
import PloopSystem
import PloopVolume

extension Ploop {
    struct Balloon: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Give space back: inflate a hidden balloon file and shrink the image under it.",
            discussion: """
                Images never shrink by themselves. 'change' grows a hidden file in the file system on \
                the device; the image clusters under it are reused for the image's tail, and the image \
                file is cut. The balloon is /.balloon-c3a5ae3d-ce7f-43c4-a1ea-c61e2b4504e8 at the file \
                system root (root-only, hidden by convention; on stock kernels ext4 does not hide it).

                Every subcommand takes -d DEVICE, -m MOUNT_POINT or the disk (DiskDescriptor.xml).

                Example (from the manual): take 600 MB back from a container's image
                  ploop balloon change -s 600m -m /vz/root/101
                  ploop balloon show /vz/private/101/root.hdd/DiskDescriptor.xml
                """,
            subcommands: [Change.self, Show.self, Status.self, Clear.self, Complete.self, CheckBalloon.self, Repair.self]
        )
    }

    /// -d and/or -m: either finds the other through /proc/mounts.
    struct Target: ParsableArguments {
        @Option(name: .short, help: ArgumentHelp("The device.", valueName: "device"))
        var device: String?
        @Option(name: .short, help: ArgumentHelp("Mount point of the file system on the device.", valueName: "mount-point"))
        var mountPoint: String?
        @OptionGroup var backend: BackendOptions
        @Flag(help: "Print the result as JSON.")
        var json = false
        @Argument(help: ArgumentHelp("Instead of -d/-m: the disk (DiskDescriptor.xml or its folder) whose running device to use.", valueName: "disk"))
        var disk: String?

        func resolve(needMount: Bool = true) throws -> (BalloonProcedure, any DeviceBackend) {
            var named = device
            if let disk {
                guard device == nil && mountPoint == nil else { throw CommandFailure("give the disk, or -d/-m, not both", code: ExitCodes.param) }
                let d = try DiskDevices.open(disk, backend: backend)
                guard let be = d.backend, let running = DiskDevices.device(of: d, backend: be) else {
                    throw CommandFailure("the disk \(d.descriptorPath) is not running: mount it first ('ploop mount -m DIR \(d.descriptorPath)')", code: ExitCodes.notMounted)
                }
                named = running.device
            }
            var mnt = mountPoint.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
            if named == nil, let m = mnt {
                guard let d = Mounts.device(at: m) else { throw CommandFailure("nothing is mounted at \(m)", code: ExitCodes.notMounted) }
                named = d
            }
            guard let given = named else { throw CommandFailure("give -d DEVICE or -m MOUNT_POINT", code: ExitCodes.param) }
            guard let node = PloopNode(given) else { throw CommandFailure("\(given) is not a ploop device (/dev/ploopN, or /dev/mapper/ploopN on dm-ploop)", code: ExitCodes.device) }
            let dev = node.device
            var offset = node.offsetBytes
            if let m = mnt {
                guard let source = Mounts.device(at: m), PloopNode(source)?.device == dev else { throw CommandFailure("\(m) is not a mount point of \(dev)", code: ExitCodes.param) }
                offset = PloopNode(source)!.offsetBytes
            } else {
                let mounted = Mounts.all().first { PloopNode($0.source)?.device == dev }
                mnt = mounted?.target
                offset = mounted.flatMap { PloopNode($0.source)?.offsetBytes } ?? 0
                if mnt == nil && needMount { throw CommandFailure("no file system of \(dev) is mounted: mount it, or give -m", code: ExitCodes.notMounted) }
            }
            let be = try backend.backend.resolve()
            let json = self.json
            var p = BalloonProcedure(backend: be, device: dev, mountPoint: mnt ?? "/nonexistent") { line in
                if !json { print(line) }
            }
            p.partitionOffset = offset
            p.progress = ProgressLine("relocating").reporter
            return (p, be)
        }
    }

    struct Change: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Resize the balloon: inflate to give image space back, deflate to give the file system space back.",
            discussion: "Example:\n  ploop balloon change -s 600m -m /mnt")
        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("New balloon size: sectors, or bytes with k/m/g/t.", valueName: "size"))
        var size: String
        @OptionGroup var target: Target
        func validate() throws { _ = try Self.bytes(size) }
        /// Like -s elsewhere, but 0 is a size here (an empty balloon).
        static func bytes(_ text: String) throws -> UInt64 {
            if text.trimmingCharacters(in: .whitespaces).allSatisfy({ $0 == "0" }) || ["0k", "0m", "0g", "0b"].contains(text.lowercased()) { return 0 }
            return try SizeOption.parse(text) * 512
        }
        func run() throws {
            let bytes = try Self.bytes(size)
            let (p, _) = try target.resolve()
            let r = try p.change(to: bytes)
            if target.json { print(try Output.json(r)) }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the balloon size.", discussion: "Example:\n  ploop balloon show -m /mnt")
        @OptionGroup var target: Target
        func run() throws {
            let (p, _) = try target.resolve()
            let size = try p.size()
            if target.json { print(try Output.json(["size": size])) } else { print("Current size of hidden balloon is \(size) bytes") }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the device's maintenance state.", discussion: "Example:\n  ploop balloon status -d /dev/ploop0")
        @OptionGroup var target: Target
        func run() throws {
            let (p, be) = try target.resolve(needMount: false)
            let state = try be.state(p.device)
            if target.json {
                print(try Output.json(["state": state.description]))
            } else {
                print("Current state of in-kernel maintenance: \(state)")
            }
        }
    }

    struct Clear: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Drop a stale BALLOON state.", discussion: "Example:\n  ploop balloon clear -d /dev/ploop0")
        @OptionGroup var target: Target
        func run() throws {
            let (p, be) = try target.resolve(needMount: false)
            let state = try be.balloon(p.device, inflate: false, keepIntact: false).state
            guard state == .off else {
                throw CommandFailure("can't clear stale in-kernel \"BALLOON\" maintenance state because kernel is in \"\(state)\" state now", code: ExitCodes.busy)
            }
            say("Current state of in-kernel maintenance is OFF now")
        }
    }

    struct Complete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Finish an interrupted FBLOAD or RELOC.", discussion: "Example:\n  ploop balloon complete -d /dev/ploop0")
        @OptionGroup var target: Target
        func run() throws {
            let (p, _) = try target.resolve(needMount: false)
            let r = try p.complete()
            if target.json { print(try Output.json(r)) }
        }
    }

    struct CheckBalloon: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "check", abstract: "Count image blocks under the balloon not yet given back.",
            discussion: "Example:\n  ploop balloon check -m /mnt")
        @OptionGroup var target: Target
        func run() throws {
            let (p, _) = try target.resolve()
            let r = try p.checkAndRepair(repair: false)
            if target.json { print(try Output.json(r)) }
        }
    }

    struct Repair: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Give back the image blocks under the balloon without changing its size.",
            discussion: "Example:\n  ploop balloon repair -m /mnt")
        @OptionGroup var target: Target
        func run() throws {
            let (p, _) = try target.resolve()
            let r = try p.checkAndRepair(repair: true)
            if target.json { print(try Output.json(r)) }
        }
    }
}

