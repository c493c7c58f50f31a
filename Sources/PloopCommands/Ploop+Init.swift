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

        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("Virtual size: sectors, or bytes with k/m/g/t.", valueName: "size"))
        var size: String

        @Option(name: .short, help: ArgumentHelp("Image format.", valueName: "format"))
        var format: ImageFormat = .ploop1

        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("Cluster size in 512-byte sectors (power of two, 64 to 131072; default 2048 = 1 MiB).", valueName: "blocksize"))
        var blocksize: String?

        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("Header version 1 or 2. Default: 2, or 1 on a ploop kernel without large-disk support.", valueName: "version"))
        var version: String?

        @Argument(help: "The image file to create.")
        var image: String

        func validate() throws {
            if let v = version, Int(v).flatMap(FormatVersion.init(rawValue:)) == nil {
                throw ValidationError("-v \(v): the header version is 1 or 2")
            }
            _ = try ClusterOption.parse(blocksize)
            _ = try SizeOption.parse(size)
        }

        func run() throws {
            let sectors = try SizeOption.parse(size)
            let v = version.flatMap { Int($0) }.flatMap(FormatVersion.init(rawValue:)) ?? DefaultVersion.detect()
            let blocksize = try ClusterOption.parse(blocksize) ?? PloopSpec.defaultClusterSectors
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
