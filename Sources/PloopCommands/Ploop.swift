import ArgumentParser
import PloopVolume
import Foundation
import PloopFormat
import PloopDevice
import PloopImage
import PloopSystem

/// The `ploop` command: the original tool's syntax, one subcommand per file.
public struct Ploop: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "ploop",
        abstract: "Manage ploop container disk images.",
        discussion: """
            A disk is a folder holding DiskDescriptor.xml and its deltas (what vzctl and prlctl \
            manage); every disk command takes the descriptor or its folder, and names snapshots by \
            GUID. The manual's forms on image paths and /dev/ploopN work as well. \
            Images are raw files or ploop1 (Parallels expandable) deltas. Sizes (-s) are 512-byte \
            sectors when given as a bare number, or bytes with a k, m, g or t suffix (binary units): \
            -s 2048 and -s 1m are the same size.

            Exit codes: 0 success, 1 failure, 2 usage error; 'ploop check' uses the original tool's \
            codes (11 format error, 17 busy, 37 image in use), and so do the file-system commands \
            (init -t, mount -m, resize, fsck): 21 mount failed, 22 umount failed, 24 mkfs failed, \
            26 resize2fs failed, 33 partition table, 38 bad parameter, 41 fsck left errors.
            """,
        version: PloopVersion.string,
        subcommands: [
            Init.self, Mount.self, Umount.self, Snapshot.self, SnapshotList.self, SnapshotDelete.self, SnapshotMerge.self, SnapshotSwitch.self, TSnapshot.self,
            Merge.self, Grow.self, Resize.self, Convert.self, Balloon.self, Copy.self, Check.self, Fsck.self, Info.self, List.self, Version.self, Replace.self, RestoreDescriptor.self, Serve.self,
        ]
    )

    public init() {}
}

public enum PloopVersion {
    public static let string = "0.1.0"
}

/// A failure that has already been put into words, with the exit code to leave with.
public struct CommandFailure: Error, CustomStringConvertible {
    public var message: String
    public var code: Int32
    public init(_ message: String, code: Int32 = 1) {
        self.message = message
        self.code = code
    }
    public var description: String { message }
}

/// Runs the CLI with the given arguments (without the program name); returns the exit code.
public enum PloopMain {
    public static func run(_ arguments: [String]) -> Int32 {
        if arguments.isEmpty {
            FileHandle.standardError.write(Ploop.helpMessage() + "\n")
            return 2
        }
        // A command alone prints its usage and exits 2, a command group (balloon) included.
        if arguments.count == 1,
            let sub = Ploop.configuration.subcommands.first(where: { $0._commandName == arguments[0] }),
            !sub.configuration.subcommands.isEmpty || (try? Ploop.parseAsRoot(arguments)) == nil
        {
            FileHandle.standardError.write(Ploop.helpMessage(for: sub) + "\n")
            return 2
        }
        do {
            var command = try Ploop.parseAsRoot(arguments)
            try command.run()
            return 0
        } catch let failure as CommandFailure {
            if !failure.message.isEmpty { FileHandle.standardError.write("ploop: \(failure.message)\n") }
            return failure.code
        } catch {
            let code = Ploop.exitCode(for: error)
            let message = Ploop.fullMessage(for: error)
            if code == .success {
                print(message)
                return 0
            }
            if code == .validationFailure {
                // One line: what is wrong, and where the usage is.
                let what = Ploop.message(for: error).trimmingCharacters(in: .whitespacesAndNewlines)
                let words = arguments.prefix { !$0.hasPrefix("-") }.prefix(2).filter { w in
                    Ploop.configuration.subcommands.contains { $0._commandName == w } || Ploop.Balloon.configuration.subcommands.contains { $0._commandName == w }
                }
                let command = (["ploop"] + words).joined(separator: " ")
                FileHandle.standardError.write("ploop: \(what.replacingOccurrences(of: "\n", with: "; ")) (see '\(command) --help')\n")
                return 2
            }
            FileHandle.standardError.write(message + "\n")
            return code.rawValue
        }
    }
}

extension FileHandle {
    /// Text out, a path's escaped bytes (see `RawPath`) written back as the bytes they stand for.
    func write(_ string: String) { write(Data(RawPath.bytes(string))) }
}

/// `print` for this module: as Swift's, but paths come out as the bytes the user typed.
func print(_ items: Any..., separator: String = " ", terminator: String = "\n") {
    let text = items.map { "\($0)" }.joined(separator: separator) + terminator
    FileHandle.standardOutput.write(text)
}

/// Turns library errors into the one line a user reads.
func failing<T>(_ body: () throws -> T) throws -> T {
    do { return try body() } catch let e as ImageError {
        throw CommandFailure(e.description)
    } catch let e as SizeArgument.ParseError {
        throw CommandFailure(e.description, code: 2)
    } catch let e as DeviceError {
        throw CommandFailure(e.description)
    }
}

/// Shared output helpers.
enum Output {
    static func json<T: Encodable>(_ value: T) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    static func size(_ bytes: UInt64) -> String { SizeArgument.describe(bytes: bytes) }
}

/// One line on a terminal for a long step: its name, percent, rate and time left, rewritten in
/// place; nothing at all when the stream is not a terminal. A step of several passes gives each
/// pass its own line (`update(step:)`).
final class ProgressLine: @unchecked Sendable {
    private let label: String
    private let handle: FileHandle
    private let enabled: Bool
    private var step = ""
    private var started = Date()
    private var lastPercent = -1

    /// On standard error (`fd` 2) by default, as the commands whose standard output is data.
    init(_ label: String, fd: Int32 = 2) {
        self.label = label
        handle = fd == 1 ? FileHandle.standardOutput : FileHandle.standardError
        enabled = isatty(fd) != 0
    }

    /// A reporter on standard output when it is a terminal; nil (quiet) otherwise.
    static func onTerminal() -> StepProgress? {
        guard isatty(1) != 0 else { return nil }
        let line = ProgressLine("", fd: 1)
        return { line.update(step: $0, $1, $2) }
    }

    func update(_ done: Int, _ total: Int) { update(step: label, done, total) }

    func update(step name: String, _ done: Int, _ total: Int) {
        guard enabled, total > 0 else { return }
        if name != step {
            if !step.isEmpty && lastPercent < 100 { handle.write("\n") }
            step = name
            started = Date()
            lastPercent = -1
        }
        let percent = min(100, done * 100 / total)
        guard percent != lastPercent else { return }
        lastPercent = percent
        let elapsed = Date().timeIntervalSince(started)
        var line = "\r\(name): \(percent)% (\(done)/\(total))"
        if elapsed > 0.5, done > 0 {
            let rate = Double(done) / elapsed
            line += String(format: ", %.0f/s", rate)
            if done < total { line += String(format: ", %.0f s left", Double(total - done) / rate) }
        }
        handle.write(line + "\u{1B}[K" + (percent == 100 ? "\n" : ""))
    }
}

extension ImageFormat: ExpressibleByArgument {}

/// `-b BLOCKSIZE`: a cluster size in sectors, with the value and the rule when it is wrong.
enum ClusterOption {
    static func parse(_ text: String?) throws -> UInt32? {
        guard let text else { return nil }
        guard let v = UInt32(text), BATLayout.isValidClusterSize(v) else {
            throw ValidationError("-b \(text): the cluster size is a power of two from 64 to 131072 sectors (32 KiB to 64 MiB)")
        }
        return v
    }
}

/// `-s SIZE`: parsed in `validate()` so the error says what is wrong with it.
enum SizeOption {
    static func parse(_ text: String) throws -> UInt64 {
        do { return try SizeArgument.sectors(text) } catch { throw ValidationError(error.description) }
    }
}
