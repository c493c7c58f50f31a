import ArgumentParser
import PloopFormat
import PloopImage

extension Ploop {
    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a new image file.",
            discussion: """
                Creates IMAGE of the given size and writes its header and (empty) BAT. IMAGE must not \
                exist; nothing is touched if it does. The size is rounded up to a whole cluster.

                Example (from the manual):
                  ploop init -s 10g /vz/private/123/root.hdd
                """
        )

        @Option(name: .short, help: ArgumentHelp("Virtual size: sectors, or bytes with k/m/g/t.", valueName: "size"))
        var size: String

        @Option(name: .short, help: ArgumentHelp("Image format.", valueName: "format"))
        var format: ImageFormat = .ploop1

        @Option(name: .short, help: ArgumentHelp("Cluster size in 512-byte sectors (power of two, 64 to 131072).", valueName: "blocksize"))
        var blocksize: UInt32 = PloopSpec.defaultClusterSectors

        @Option(name: .short, help: ArgumentHelp("Header version 1 or 2. Default: 2, or 1 on a ploop kernel without large-disk support.", valueName: "version"))
        var version: Int?

        @Argument(help: "The image file to create.")
        var image: String

        func validate() throws {
            if let v = version, FormatVersion(rawValue: v) == nil {
                throw ValidationError("-v takes 1 or 2, not \(v)")
            }
            if !BATLayout.isValidClusterSize(blocksize) {
                throw ValidationError("-b \(blocksize): the cluster size must be a power of two from 64 to 131072 sectors (32 KiB to 64 MiB)")
            }
            _ = try SizeOption.parse(size)
        }

        func run() throws {
            let sectors = try SizeOption.parse(size)
            let v = version.flatMap(FormatVersion.init(rawValue:)) ?? DefaultVersion.detect()
            let header = try failing {
                try Offline.initialize(.init(path: image, sizeSectors: sectors, format: format, clusterSectors: blocksize, version: v))
            }
            switch format {
            case .ploop1:
                print("Created \(image): ploop1 \(v), \(Output.size(header.virtualBytes)), \(Output.size(UInt64(header.clusterBytes))) clusters")
            case .raw:
                print("Created \(image): raw, \(Output.size(header.virtualBytes))")
            }
        }
    }
}
