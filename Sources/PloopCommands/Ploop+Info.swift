import ArgumentParser
import PloopDisk
import PloopFormat
import PloopImage
import PloopVolume

extension Ploop {
    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show what an image is: format, sizes, allocation, in-use mark.",
            discussion: """
                Reads the image without locking or changing it. With a disk (DiskDescriptor.xml or its \
                folder): -s prints its size, cluster size and format version as the original does, -d \
                the device running it.

                Examples:
                  ploop info --json root.hdd
                  ploop info -s DiskDescriptor.xml
                """
        )

        @Flag(help: "Print as JSON.")
        var json = false

        @Flag(name: .short, help: "With a disk: size, blocksize and format version.")
        var spec = false
        @Flag(name: .short, help: "With a disk: the device running it.")
        var device = false
        @OptionGroup var backend: BackendOptions

        @Argument(help: "The image to describe, or a disk (DiskDescriptor.xml or its folder).")
        var image: String

        func run() throws {
            if Disk.descriptorPath(for: image) != nil {
                try DiskCommands.info(image, spec: spec, device: device, json: json, backend: backend)
                return
            }
            if spec || device { throw CommandFailure("-s and -d describe a disk: give DiskDescriptor.xml or its folder", code: ExitCodes.param) }
            let info = try ImageInfo.read(path: image)
            if json {
                print(try Output.json(info))
                return
            }
            var rows: [(String, String)] = [("image", info.path)]
            switch info.format {
            case .raw:
                rows.append(("format", "raw"))
                rows.append(("virtual size", "\(Output.size(info.virtualSize)) (\(info.virtualSize) bytes)"))
            case .ploop1:
                rows.append(("format", "ploop1 v\(info.version ?? 0)"))
                rows.append(("virtual size", "\(Output.size(info.virtualSize)) (\(info.virtualSize / 512) sectors)"))
                let cs = UInt64(info.clusterSize ?? 0)
                rows.append(("cluster size", "\(Output.size(cs)) (\(cs / 512) sectors)"))
                let a = info.allocatedClusters ?? 0
                rows.append(("allocated", "\(a) of \(info.batEntries ?? 0) clusters (\(Output.size(UInt64(a) * cs)))"))
                rows.append(("in use", info.inUse ? "yes (not closed cleanly, or open by a device)" : "no"))
                rows.append(("flags", info.flags.isEmpty ? "none" : info.flags.joined(separator: ", ")))
                rows.append(("first data at", Output.size(info.firstDataOffset ?? 0)))
            }
            rows.append(("file size", "\(Output.size(info.fileSize)) (\(info.fileSize) bytes)"))
            for (k, v) in rows { print("\((k + ":").padding(toLength: 15, withPad: " ", startingAt: 0))\(v)") }
        }
    }
}
