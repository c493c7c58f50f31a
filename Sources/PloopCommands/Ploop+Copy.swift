import ArgumentParser
import Foundation
import PloopCopy
import PloopSystem
import PloopDevice
import PloopDisk
import PloopVolume

extension Ploop {
    struct Copy: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy a running device's image with a short frozen window (live migration).",
            discussion: """
                Local:    ploop copy -s DEVICE|DiskDescriptor.xml -d IMAGE [-F CMD]
                Sender:   ploop copy -s DEVICE [-F CMD] [-o FD] [-f FEEDBACK_FD]   (stream on stdout)
                Receiver: ploop copy -d IMAGE [-i FD] [-f FEEDBACK_FD]             (stream from stdin)

                The sender copies the top image while the device runs, then what was written \
                meanwhile, pass after pass, until that stops shrinking; then it runs -F (e.g. a \
                command that stops the container), freezes the file system mounted on the device, \
                copies the last changes and ends the stream. The stream is the original tool's \
                classic format. The receiver builds IMAGE under a temporary name and publishes it \
                only when the stream ends properly; an existing IMAGE is refused without --replace.

                Example (from the manual), across two hosts:
                  ploop copy -s /dev/ploop0 -F 'vzctl chkpnt 101' | ssh dst ploop copy -d /vz/private/101/root.hdd
                """
        )

        @Option(name: .short, help: ArgumentHelp("Source device (sender).", valueName: "device"))
        var source: String?
        @Option(name: .short, help: ArgumentHelp("Destination image (receiver, or local copy with -s).", valueName: "image"))
        var destination: String?
        @Option(name: [.customShort("F")], help: ArgumentHelp("Command to run before the freeze.", valueName: "command"))
        var stopCommand: String?
        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("Sender: write the stream to this descriptor.", valueName: "fd"))
        var output: Int32 = 1
        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("Receiver: read the stream from this descriptor.", valueName: "fd"))
        var input: Int32 = 0
        @Option(name: .short, parsing: .unconditional, help: ArgumentHelp("Feedback descriptor for sync answers.", valueName: "fd"))
        var feedback: Int32?
        @Flag(help: "Replace an existing destination.")
        var replace = false
        @Flag(help: "Print the report as JSON (on stderr when the stream is on stdout).")
        var json = false
        @OptionGroup var backend: BackendOptions

        func validate() throws {
            if source == nil && destination == nil { throw ValidationError("give -s DEVICE (sender), -d IMAGE (receiver) or both (local copy)") }
        }

        func run() throws {
            let err = { (line: String) in Console.write(to: .error, line) }
            if var dev = source {
                let be = try backend.backend.resolve()
                // A disk (DiskDescriptor.xml or its folder) is copied from the device running it.
                if DeviceName.canonical(dev) == nil, Disk.descriptorPath(for: dev) != nil {
                    let d = try DiskDevices.open(dev, backend: backend)
                    guard let running = DiskDevices.device(of: d, backend: be) else {
                        throw CommandFailure(DiskError.notMounted(d.descriptorPath).description + ": copy the image files instead, or mount it", code: ExitCodes.notMounted)
                    }
                    dev = running.device
                }
                let sink: any CopySink
                if let d = destination {
                    sink = try FileSink(destination: URL(fileURLWithPath: d).standardizedFileURL.path, replace: replace)
                } else {
                    Signals.ignoreBrokenPipe()
                    try CopyStream.checkOpen(output, "output descriptor (-o)", "the stream to write")
                    if let fb = feedback { try CopyStream.checkOpen(fb, "feedback descriptor (-f)", "the channel back from the receiver") }
                    sink = StreamSink(fd: output, feedback: feedback)
                }
                var sender = CopySender(backend: be, device: dev, mountPoint: Mounts.mountPoints(ofDeviceOrPartitions: dev).first, stopCommand: stopCommand) { err("ploop copy: \($0)\n") }
                // On stderr: the stream or the copy's messages may hold stdout.
                sender.progress = ProgressLine("copying").reporter
                let r = try sender.run(into: sink)
                let line = String(format: "copied %llu bytes in %d passes, %.3f s total, frozen %.3f s (%.1f%%)", r.bytesSent, r.passes, r.totalSeconds, r.frozenSeconds, r.totalSeconds > 0 ? 100 * r.frozenSeconds / r.totalSeconds : 0)
                if json {
                    let text = try Output.json(r)
                    if destination == nil { err(text + "\n") } else { print(text) }
                } else {
                    err("ploop copy: \(line)\n")
                }
                return
            }
            let receiver = CopyReceiver(destination: URL(fileURLWithPath: destination!).standardizedFileURL.path, replace: replace)
            let s = try receiver.receive(input: input, feedback: feedback)
            if json { print(try Output.json(s)) } else { err("ploop copy: received \(s.bytes) bytes in \(s.records) records\n") }
        }
    }
}

