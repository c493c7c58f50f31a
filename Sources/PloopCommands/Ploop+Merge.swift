import ArgumentParser
import PloopImage

extension Ploop {
    struct Merge: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Merge deltas offline into a destination image.",
            discussion: """
                SRC... are ploop1 deltas listed top-most first; DST is the image they are merged into \
                (the last argument). For every cluster the copy in the top-most source that has it wins. \
                DST grows first if a source is larger. The sources are left as they were. Interrupted, \
                DST still passes 'ploop check', and running the same merge again finishes it.

                Example (from the manual): merge a snapshot delta into its raw base
                  ploop merge -f raw root.hdd.1 root.hdd
                """
        )

        @Option(name: .short, help: ArgumentHelp("Format of DST.", valueName: "format"))
        var format: ImageFormat = .ploop1

        @Flag(help: "Print the result as JSON.")
        var json = false

        @Argument(help: ArgumentHelp("Source deltas (top-most first), then DST.", valueName: "SRC... DST"))
        var images: [String] = []

        func validate() throws {
            guard images.count >= 2 else {
                throw ValidationError("give at least one source delta and the destination: ploop merge SRC... DST")
            }
        }

        func run() throws {
            let sources = Array(images.dropLast())
            let dst = images.last!
            let progress = ProgressLine("merging")
            let summary = try failing {
                try Offline.merge(sources: sources, destination: dst, format: format, progress: progress.update)
            }
            if json {
                print(try Output.json(summary))
            } else {
                if summary.repairedStaleMark { print("\(dst) was not closed cleanly; checked and repaired first") }
                if summary.destinationGrew { print("\(dst) grown to fit the sources") }
                print("Merged \(sources.count) delta(s) into \(dst): \(summary.clustersCopied) cluster(s) copied")
            }
        }
    }
}
