import ArgumentParser
import Foundation
import PloopDisk
import PloopFormat
import PloopImage
import PloopVolume

extension Ploop {
    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a new image file.",
            discussion: """
                Creates IMAGE of the given size and writes its header and (empty) BAT, and \
                DiskDescriptor.xml beside it, so the folder is a disk that the descriptor commands \
                (snapshot, snapshot-list, mount DiskDescriptor.xml ...) manage. IMAGE must not exist and \
                the folder must not hold a descriptor yet; nothing is touched if either does. The size is \
                rounded up to a whole cluster. --no-descriptor creates the image only (the manual's init). \
                -f preallocated gives every cluster its block before the image appears (space reserved with \
                fallocate, reading zeros), so writes never extend the file; the descriptor records it.

                With -t ext4 or -t ext3 the disk gets a GPT with one partition aligned to the cluster \
                size, the file system on it (mke2fs with lazy inode-table and journal initialisation \
                unless -n, stride of one cluster) and the empty hidden balloon file in its root; a device \
                is started for that and stopped again, and if any step fails every file init made is \
                removed. The type defaults to none here (as the manual's init); the original v7 defaults \
                to ext4, so give -t ext4 to get its disks.

                Example (a container disk as vzctl makes it):
                  ploop init -s 10g -t ext4 /vz/private/123/root.hdd/root.hds

                Example (from the manual):
                  ploop init -s 10g /vz/private/123/root.hdd/root.hds
                """
        )

        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("Virtual size: sectors, or bytes with k/m/g/t.", valueName: "size"))
        var size: String

        @Option(name: .short, help: ArgumentHelp("Image layout: ploop1 or expanded (grows as written, the default), preallocated (every cluster's space reserved up front), raw (a plain file).", valueName: "format"))
        var format: String = "ploop1"

        var layout: Offline.Layout { Offline.Layout(argument: format)! }

        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("Cluster size in 512-byte sectors (power of two, 64 to 131072; default 2048 = 1 MiB).", valueName: "blocksize"))
        var blocksize: String?

        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("Header version 1 or 2. Default: 2, or 1 on a ploop kernel without large-disk support.", valueName: "version"))
        var version: String?

        @Option(name: .short, help: ArgumentHelp("File system to make on the disk: none (the default), ext4 or ext3.", valueName: "fstype"))
        var type: String = "none"

        @Option(name: .customShort("B"), help: ArgumentHelp("File-system block size in bytes (1024, 2048 or 4096; default 4096).", valueName: "fsblocksize"))
        var fsBlockSize: Int?

        @Option(name: .customShort("L"), help: ArgumentHelp("File-system label.", valueName: "label"))
        var label: String?

        @Flag(name: [.customShort("n"), .customLong("nolazy")], help: "Initialise inode tables and the journal now, not lazily after the first mount.")
        var noLazy = false

        @OptionGroup var backend: BackendOptions

        @Flag(name: .customLong("no-descriptor"), help: "Create the image only, without DiskDescriptor.xml (the manual's init).")
        var noDescriptor = false

        @Argument(help: "The image file to create.")
        var image: String

        func validate() throws {
            guard Offline.Layout(argument: format) != nil else {
                throw ValidationError("-f \(format): the format is ploop1 (= expanded), expanded, preallocated or raw")
            }
            if let v = version, Int(v).flatMap(FormatVersion.init(rawValue:)) == nil {
                throw ValidationError("-v \(v): the header version is 1 or 2")
            }
            _ = try ClusterOption.parse(blocksize)
            _ = try SizeOption.parse(size)
            switch type {
            case "none":
                if fsBlockSize != nil || label != nil || noLazy { throw ValidationError("-B, -L and -n go with a file system: give -t ext4 or -t ext3") }
            case "ext4", "ext3":
                if noDescriptor { throw ValidationError("-t \(type) makes a disk (DiskDescriptor.xml): drop --no-descriptor") }
                if layout.format == .raw { throw ValidationError("-t \(type) with -f raw: give a ploop1 layout (expanded or preallocated)") }
                if let b = fsBlockSize, ![1024, 2048, 4096].contains(b) { throw ValidationError("-B \(b): the file-system block size is 1024, 2048 or 4096") }
            default: throw ValidationError("-t \(type): the file system type is none, ext4 or ext3")
            }
        }

        func run() throws {
            let sectors = try SizeOption.parse(size)
            let v = version.flatMap { Int($0) }.flatMap(FormatVersion.init(rawValue:)) ?? DefaultVersion.detect()
            let blocksize = try ClusterOption.parse(blocksize) ?? PloopSpec.defaultClusterSectors
            let request = Offline.InitRequest(path: image, sizeSectors: sectors, format: layout.format, clusterSectors: blocksize, version: v, preallocated: layout == .preallocated)
            let header: ImageHeader
            var stored: String?
            if noDescriptor {
                header = try Offline.initialize(request)
            } else {
                let (d, dd) = try Disk.initialize(request) { print($0) }
                header = try ImageHeader.new(sizeSectors: d.diskSizeSectors, clusterSectors: d.blocksize, version: v)
                stored = dd
            }
            switch layout.format {
            case .ploop1:
                let how = layout == .preallocated ? " preallocated" : ""
                say("Created \(image): ploop1 \(v)\(how), \(Output.size(header.virtualBytes)), \(Output.size(UInt64(header.clusterBytes))) clusters")
            case .raw:
                say("Created \(image): raw, \(Output.size(header.virtualBytes))")
            }
            if let stored {
                say("Storing \(stored)")
                if type != "none" {
                    let made = [URL(fileURLWithPath: image).standardizedFileURL.path, stored, stored + ".lck"]
                    let options = FileSystem.MakeOptions(type: type, blockSize: fsBlockSize, label: label, lazy: !noLazy)
                    try DiskCommands.makeFileSystem(descriptor: stored, options: options, backend: backend, made: made)
                }
            }
        }
    }
}
