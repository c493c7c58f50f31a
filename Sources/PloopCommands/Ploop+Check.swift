import ArgumentParser
import PloopDisk
import PloopFormat
import PloopImage

extension Ploop {
    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check and repair a ploop1 image.",
            discussion: """
                Checks the header, every BAT entry (beyond the size, beyond EOF, misaligned, into the \
                header/BAT area, used twice), the tail of the file and the in-use mark, and says for \
                each problem what it did: Fixed, Skipped (read-only), FATAL (needs -F) or Reported. A \
                clean image is only checked with -f. With -c, unreferenced blocks are listed as ranges.

                Exit codes: 0 clean or repaired; 11 problems remain (format error); 17 image busy \
                (version conversion in progress); 37 in-use mark set (use -d); 1 the file could not be \
                opened; 2 usage.

                Example (from the manual): after a crash, check and clear the in-use mark
                  ploop check -f -d root.hdd
                """
        )

        @Flag(name: [.customShort("f"), .customLong("force")], help: "Check even if the image is marked clean.")
        var force = false
        @Flag(name: [.customShort("F"), .customLong("hard-force")], help: "Also apply fatal fixes: zero BAT entries that point to invalid places (their data is lost), and give each cluster that shares a block with another its own copy of it.")
        var hardForce = false
        @Flag(name: [.customShort("c"), .customLong("check")], help: "Also report unreferenced blocks (holes).")
        var detailed = false
        @Flag(name: [.customShort("r"), .customLong("ro")], help: "Read-only: report, never write.")
        var readOnly = false
        @Flag(name: [.customShort("d"), .customLong("drop-inuse")], help: "Clear the in-use mark.")
        var dropInuse = false
        @Flag(name: [.customShort("s"), .customLong("silent")], help: "Print nothing but errors.")
        var silent = false
        @Flag(name: [.customShort("R"), .customLong("raw")], help: "The image is raw (needs -b).")
        var raw = false
        @Option(name: [.customShort("b"), .customLong("blocksize")], parsing: .unconditional, help: ArgumentHelp("Cluster size in sectors, with -R.", valueName: "sectors"))
        var blocksize: String?
        @Flag(name: [.customShort("S"), .customLong("repair-sparse")], help: "Fill holes inside used clusters with zeros.")
        var repairSparse = false
        @Flag(help: "Print the report as JSON.")
        var json = false

        @Option(name: [.customShort("u"), .customLong("uuid")], help: ArgumentHelp("With a disk: check up to this snapshot.", valueName: "GUID"))
        var uuid: String?

        @Argument(help: "The image to check, or a disk (DiskDescriptor.xml or its folder): every delta of its chain.")
        var image: String

        func validate() throws {
            if raw && blocksize == nil { throw ValidationError("-R needs the cluster size: -b SECTORS") }
            _ = try ClusterOption.parse(blocksize)
        }

        func run() throws {
            var o = Checker.Options()
            o.force = force || hardForce
            o.hardForce = hardForce
            o.detailed = detailed
            o.readOnly = readOnly
            o.dropInUse = dropInuse
            o.repairSparse = repairSparse
            if !raw, Disk.descriptorPath(for: image) != nil {
                try DiskCommands.check(image, uuid: uuid, options: o, silent: silent, json: json, hardForce: hardForce)
                return
            }
            if uuid != nil { throw CommandFailure("-u names a snapshot of a disk: give DiskDescriptor.xml", code: ExitCodes.param) }
            // A large image's BAT and hole scans show their progress (stderr: a terminal, or
            // JSON events with --json).
            let progress = ProgressLine("checking").reporter
            let report = try Checker.check(path: image, options: o, raw: raw, progress: progress)
            if json {
                print(try Output.json(JSONReport(report)))
            } else if !silent {
                Self.show(report, image: image, hardForce: hardForce)
            }
            if report.exitCode != 0 { throw CommandFailure("", code: report.exitCode) }
        }

        /// The report as the user reads it: each finding with what was done, then the outcome.
        static func show(_ report: Checker.Report, image: String, hardForce: Bool) {
            if report.status == .skipped {
                print("\(image): image is clean, check is skipped (use -f to check anyway)")
            }
            for f in report.findings {
                print("\(image): \(f.message): \(f.action.rawValue)")
            }
            switch report.status {
            case .ok:
                let fixed = report.findings.contains { $0.action == .fixed }
                print("\(image): \(fixed ? "repaired" : "no problems found")")
            case .skipped: break
            case .formatError:
                let hint = report.findings.contains { $0.action == .fatal } && !hardForce ? " (-F applies fatal fixes, losing those clusters)" : ""
                print("\(image): problems remain: image is not repaired\(hint)")
            case .inUse: print("\(image): in-use mark is set: if no device uses the image, run again with -d")
            case .busy: print("\(image): image is busy: finish the operation in progress first")
            }
        }
    }

    /// The JSON shape of a check report.
    struct JSONReport: Encodable {
        var image: String
        var status: String
        var exitCode: Int32
        var version: Int?
        var allocatedClusters: Int
        var findings: [Item]
        struct Item: Encodable {
            var problem: String
            var action: String
        }
        init(_ r: Checker.Report) {
            image = r.path
            status = r.status.rawValue
            exitCode = r.exitCode
            version = r.version?.rawValue
            allocatedClusters = r.allocatedClusters
            findings = r.findings.map { Item(problem: $0.message, action: $0.action.rawValue) }
        }
    }
}
