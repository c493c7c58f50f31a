import ArgumentParser
import Foundation
import PloopKernel
import PloopSimulator
import PloopVolume

extension Ploop {
    struct Version: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print the version and what this host offers: the kernel driver, the simulator, the tools.",
            discussion: """
                The first thing a bug report needs. '--version' prints the version and the git commit \
                it was built from (for scripts: the first word is the version); this adds which \
                device backends can run here and why not, and the external tools the \
                file-system commands use.

                Example:
                  ploop version --json
                """
        )

        @Flag(help: "Print the report as JSON.")
        var json = false

        struct Backend: Encodable {
            var name: String
            var available: Bool
            var why: String?
        }

        struct Report: Encodable {
            var version: String
            /// The git commit built from (absent outside a git checkout).
            var commit: String?
            var uncommittedChanges: Bool
            var kernelModule: Bool
            var largeDisks: Bool
            var backends: [Backend]
            var defaultBackend: String
            var tools: [String: String]
        }

        static func report() -> Report {
            let module = KernelDeviceState.module()
            let dm = DMPloopBackend.unavailableReason()
            let kernel = KernelBackend.unavailableReason()
            let simulator = SimulatorBackend.unavailableReason()
            var tools: [String: String] = [:]
            for t in ["mke2fs", "e2fsck", "resize2fs", "dumpe2fs", "mount", "umount"] { tools[t] = Tool.path(t) ?? "missing" }
            return Report(
                version: PloopVersion.number, commit: PloopVersion.commit.isEmpty ? nil : PloopVersion.commit,
                uncommittedChanges: PloopVersion.uncommittedChanges, kernelModule: module.loaded, largeDisks: module.largeDisks,
                backends: [
                    Backend(name: "dm", available: dm == nil, why: dm),
                    Backend(name: "kernel", available: kernel == nil, why: kernel),
                    Backend(name: "simulator", available: simulator == nil, why: simulator),
                ],
                defaultBackend: dm == nil ? "dm" : module.loaded ? "kernel" : "simulator", tools: tools)
        }

        func run() throws {
            let r = Self.report()
            if json {
                print(try Output.json(r))
                return
            }
            print("ploop \(PloopVersion.string)")
            print("kernel module: \(r.kernelModule ? "loaded" + (r.largeDisks ? " (large disks: yes)" : "") : "not loaded")")
            for b in r.backends { print("backend \(b.name): \(b.available ? "available" : "unavailable: \(b.why ?? "")")") }
            print("default backend: \(r.defaultBackend)")
            for (t, p) in r.tools.sorted(by: { $0.key < $1.key }) { print("\(t): \(p)") }
        }
    }
}
