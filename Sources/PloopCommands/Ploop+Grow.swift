import ArgumentParser
import PloopDisk
import PloopFormat
import PloopImage

extension Ploop {
    struct Grow: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Grow an image offline, or a running device online.",
            discussion: """
                Grows IMAGE to SIZE (rounded up to a whole cluster). When the BAT needs more room, the \
                data clusters in its way are moved to the end of the file first. Images never shrink \
                this way: to give space back, inflate a balloon ('ploop balloon change').

                With -d the running device grows at once (its new size is visible to the kernel, so \
                resize2fs can grow a mounted file system right after).

                With a disk (DiskDescriptor.xml or its folder): every image of it and the descriptor \
                offline, or the device running it online.

                Examples (from the manual):
                  ploop grow -s 20g root.hdd
                  ploop grow -s 20g -d /dev/ploop0
                  ploop grow -s 20g DiskDescriptor.xml
                """
        )

        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("New virtual size: sectors, or bytes with k/m/g/t.", valueName: "size"))
        var size: String

        @Option(name: .short, help: ArgumentHelp("Image format (detected when not given).", valueName: "format"))
        var format: ImageFormat?

        @Option(name: .short, help: ArgumentHelp("Grow this running device.", valueName: "device"))
        var device: String?

        @OptionGroup var backend: BackendOptions

        @Flag(help: "Print the result as JSON (see docs/JSON.md).")
        var json = false

        @Argument(help: "The image to grow (offline).")
        var image: String?

        func validate() throws {
            _ = try SizeOption.parse(size)
            if (device == nil) == (image == nil) { throw ValidationError("give either -d DEVICE (online) or IMAGE (offline)") }
        }

        /// What was grown and its size now.
        struct Grown: Encodable {
            /// The image, device or descriptor given.
            var target: String
            var descriptor: String?
            var device: String?
            var sizeBytes: UInt64
            var sizeSectors: UInt64

            init(target: String, descriptor: String? = nil, device: String? = nil, sizeBytes: UInt64) {
                self.target = target
                self.descriptor = descriptor
                self.device = device
                self.sizeBytes = sizeBytes
                self.sizeSectors = sizeBytes / 512
            }

            /// How the text names it: the device and its disk, whichever are known.
            var name: String {
                switch (device, descriptor) {
                case let (dev?, dd?): "\(dev) (\(dd))"
                case let (dev?, nil): dev
                case let (nil, dd?): dd
                case (nil, nil): target
                }
            }
        }

        func run() throws {
            let sectors = try SizeOption.parse(size)
            let grown: Grown
            if let dev = device {
                let be = try backend.backend.resolve()
                try be.grow(dev, sizeSectors: sectors)
                let info = try be.info(dev)
                grown = Grown(target: dev, device: dev, sizeBytes: info.sizeBytes)
            } else if Disk.descriptorPath(for: image!) != nil {
                grown = try DiskCommands.grow(image!, sectors: sectors, backend: backend)
            } else {
                let image = self.image!
                let progress = ProgressLine("relocating")
                try Offline.grow(path: image, toSectors: sectors, format: format, progress: progress.update)
                let info = try ImageInfo.read(path: image)
                grown = Grown(target: image, sizeBytes: info.virtualSize)
            }
            if json {
                print(try Output.json(grown))
            } else {
                say("Grown \(grown.name) to \(Output.size(grown.sizeBytes))")
            }
        }
    }
}
