import ArgumentParser
import PloopDevice
import PloopImage

extension Ploop {
    struct Merge: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Merge deltas: offline into a destination image, or online on a running device.",
            discussion: """
                Online: -d DEVICE [-l L1..L2] merges levels L1+1..L2 into L1 while the device keeps \
                serving I/O (default: the top into the level below it; -l L means L..top). The merged \
                levels leave the stack and the ones above renumber; their files are kept and listed.

                Offline: SRC... are ploop1 deltas listed top-most first; DST is the image they are merged into \
                (the last argument). For every cluster the copy in the top-most source that has it wins. \
                DST grows first if a source is larger. The sources are left as they were. Interrupted, \
                DST still passes 'ploop check', and running the same merge again finishes it.

                Examples (from the manual):
                  ploop merge -d /dev/ploop0 -l 0..2
                  ploop merge -f raw root.hdd.1 root.hdd
                """
        )

        @Option(name: .short, help: ArgumentHelp("Format of DST.", valueName: "format"))
        var format: ImageFormat = .ploop1

        @Option(name: .short, help: ArgumentHelp("Merge online on this running device.", valueName: "device"))
        var device: String?

        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("Levels to merge online: L1..L2, or L for L..top.", valueName: "levels"))
        var levels: String?

        @OptionGroup var backend: BackendOptions

        @Flag(help: "Print the result as JSON.")
        var json = false

        @Argument(help: ArgumentHelp("Source deltas (top-most first), then DST.", valueName: "SRC... DST"))
        var images: [String] = []

        func validate() throws {
            if device != nil {
                guard images.isEmpty else { throw ValidationError("an online merge (-d) takes no image arguments") }
                if let l = levels { _ = try Self.parseLevels(l) }
                return
            }
            if levels != nil { throw ValidationError("-l needs -d DEVICE (online merge)") }
            guard images.count >= 2 else {
                throw ValidationError("give at least one source delta and the destination: ploop merge SRC... DST")
            }
        }

        /// `L1..L2` or `L` (nil upper bound: the top).
        static func parseLevels(_ text: String) throws -> (Int, Int?) {
            let parts = text.split(separator: ".", omittingEmptySubsequences: true)
            func level(_ s: Substring) -> Int? { s.allSatisfy({ $0.isASCII && $0.isNumber }) && s.count < 6 ? Int(s) : nil }
            guard (1...2).contains(parts.count), text.filter({ $0 == "." }).count == (parts.count == 2 ? 2 : 0),
                let a = level(parts[0])
            else { throw ValidationError("-l \(text): give L1..L2 or L (levels are numbers from 0, the base)") }
            guard parts.count == 2 else { return (a, nil) }
            guard let b = level(parts[1]) else { throw ValidationError("-l \(text): give L1..L2 or L (levels are numbers from 0, the base)") }
            guard a < b else { throw ValidationError("-l \(text): the first level must be below the second") }
            return (a, b)
        }

        /// The levels asked for, checked against the device's 0...top.
        static func levelRange(_ text: String?, top: Int, device: String) throws -> ClosedRange<Int> {
            guard top > 0 else { throw CommandFailure("\(device) has one level (0): there is nothing to merge", code: ExitCodes.param) }
            guard let text else { return (top - 1)...top }
            let (a, b) = try parseLevels(text)
            let upper = b ?? top
            guard a < top, upper <= top else {
                throw CommandFailure("-l \(text): \(device) has levels 0..\(top), so give L1..L2 with L1 < L2 <= \(top)", code: ExitCodes.param)
            }
            return a...upper
        }

        func run() throws {
            if let dev = device {
                let be = try backend.backend.resolve()
                let info = try be.info(dev)
                let range = try Self.levelRange(levels, top: info.levels.count - 1, device: dev)
                let progress = ProgressLine("merging")
                let removed = try be.merge(dev, levels: range) { progress.update($0, $1) }
                if json {
                    print(try Output.json(["merged": removed]))
                } else {
                    say("Merged levels \(range.lowerBound)..\(range.upperBound) of \(dev); files no longer in the stack: \(removed.joined(separator: " "))")
                }
                return
            }
            let sources = Array(images.dropLast())
            let dst = images.last!
            let progress = ProgressLine("merging")
            let summary = try Offline.merge(sources: sources, destination: dst, format: format, progress: progress.update)
            if json {
                print(try Output.json(summary))
            } else {
                if summary.repairedStaleMark { say("\(dst) was not closed cleanly; checked and repaired first") }
                if summary.destinationGrew { say("\(dst) grown to fit the sources") }
                say("Merged \(sources.count) delta(s) into \(dst): \(summary.clustersCopied) cluster(s) copied")
            }
        }
    }
}
