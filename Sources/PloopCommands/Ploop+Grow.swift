import ArgumentParser
import PloopFormat
import PloopImage

extension Ploop {
    struct Grow: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Grow an image offline.",
            discussion: """
                Grows IMAGE to SIZE (rounded up to a whole cluster). When the BAT needs more room, the \
                data clusters in its way are moved to the end of the file first. Images never shrink \
                this way: to give space back, inflate a balloon ('ploop balloon change').

                Example (from the manual):
                  ploop grow -s 20g root.hdd
                """
        )

        @Option(name: .short, help: ArgumentHelp("New virtual size: sectors, or bytes with k/m/g/t.", valueName: "size"))
        var size: String

        @Option(name: .short, help: ArgumentHelp("Image format (detected when not given).", valueName: "format"))
        var format: ImageFormat?

        @Argument(help: "The image to grow.")
        var image: String

        func validate() throws { _ = try SizeOption.parse(size) }

        func run() throws {
            let sectors = try SizeOption.parse(size)
            let progress = ProgressLine("relocating")
            try failing { try Offline.grow(path: image, toSectors: sectors, format: format, progress: progress.update) }
            let info = try failing { try ImageInfo.read(path: image) }
            print("Grown \(image) to \(Output.size(info.virtualSize))")
        }
    }
}
