import ArgumentParser
import Synchronization
import CPloopBuild
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

            Global options, before the command: -q prints only errors and the data asked for; \
            -v, -vv… or -v N (N from -1 to 5; 3 is the default) print more: at 4 debug lines on \
            stderr, and the simulator daemon of a device mounted then logs every request to the \
            log file 'ploop list' shows.

            Exit codes, the original tool's where it has one for the case:
            \(ExitCodes.helpText)
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
    /// The release; `scripts/package` names the .deb after it.
    public static let number = "0.1.0"
    /// The git commit the binary was built from ("" outside a git checkout).
    public static let commit = String(cString: ploop_build_commit())
    /// Whether that checkout had changes not committed.
    public static let uncommittedChanges = ploop_build_uncommitted_changes() != 0
    /// What `ploop --version` prints: `0.1.0 (git 0123456789ab)`, `+changes` after the hash for
    /// a checkout with uncommitted changes, the number alone outside git.
    public static let string = commit.isEmpty ? number : "\(number) (git \(commit.prefix(12))\(uncommittedChanges ? "+changes" : ""))"
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
    public static func run(_ all: [String]) -> Int32 {
        let level: Int, arguments: [String]
        do { (level, arguments) = try Verbosity.take(all) } catch {
            Console.write(to: .error, "ploop: \(error.message)\n")
            return error.code
        }
        return Verbosity.with(level) {
            let code = dispatch(arguments)
            log.debug("exit \(code)", metadata: ["command": .string(arguments.first ?? "")])
            return code
        }
    }

    static func dispatch(_ arguments: [String]) -> Int32 {
        if arguments.isEmpty {
            Console.write(to: .error, Ploop.helpMessage() + "\n")
            return ExitCodes.param
        }
        // A command alone prints its usage and exits as a usage error, a command group (balloon) included.
        if arguments.count == 1,
            let sub = Ploop.configuration.subcommands.first(where: { $0._commandName == arguments[0] }),
            !sub.configuration.subcommands.isEmpty || (try? Ploop.parseAsRoot(arguments)) == nil
        {
            Console.write(to: .error, Ploop.helpMessage(for: sub) + "\n")
            return ExitCodes.param
        }
        // With --json, progress goes to stderr as JSON lines (see ProgressLine).
        return ProgressLine.$events.withValue(arguments.contains("--json")) { run(parsing: arguments) }
    }

    /// Parses and runs one command; every error becomes its message and exit code.
    static func run(parsing arguments: [String]) -> Int32 {
        do {
            var command = try Ploop.parseAsRoot(arguments)
            log.debug("running \(type(of: command)._commandName)", metadata: ["verbosity": "\(Verbosity.level)"])
            try command.run()
            return 0
        } catch let failure as CommandFailure {
            if !failure.message.isEmpty { Console.write(to: .error, "ploop: \(failure.message)\n") }
            return failure.code
        } catch {
            // A library error (commands let them through as they are): its own words, and the
            // code ExitCodes gives its case.
            if let code = ExitCodes.of(error) {
                Console.write(to: .error, "ploop: \(error)\n")
                return code
            }
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
                Console.write(to: .error, "ploop: \(what.replacingOccurrences(of: "\n", with: "; ")) (see '\(command) --help')\n")
                return ExitCodes.param
            }
            Console.write(to: .error, message + "\n")
            return code.rawValue
        }
    }
}

/// `print` for this module: as Swift's, but paths come out as the bytes the user typed.
func print(_ items: Any..., separator: String = " ", terminator: String = "\n") {
    let text = items.map { "\($0)" }.joined(separator: separator) + terminator
    Console.write(to: .output, text)
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

/// Progress of a long step, in one of two forms:
///   - on a terminal, one line rewritten in place: the step's name, percent, rate and time left
///     (a step of several passes gives each pass its own line, `update(step:)`); nothing when the
///     stream is not a terminal;
///   - with `--json` (`ProgressLine.events`), one JSON object per line on standard error, whether
///     or not it is a terminal, for scripts: `{"event":"progress","step":…,"done":…,"total":…,
///     "percent":…}` plus `rate` (units per second) and `secondsLeft` once they are known.
///     Standard output keeps the one JSON document the command prints at the end.
final class ProgressLine: @unchecked Sendable {
    private let label: String
    private let stream: Console.Stream
    private let enabled: Bool
    private let asEvents: Bool
    private var step = ""
    private var started = Date()
    private var lastPercent = -1

    /// Bound for the command by `PloopMain` (true when `--json` is given).
    @TaskLocal static var events = false

    /// On standard error by default, as the commands whose standard output is data.
    init(_ label: String, on stream: Console.Stream = .error) {
        self.label = label
        asEvents = Self.events
        self.stream = asEvents ? .error : stream
        enabled = asEvents || Console.isTerminal(stream)
    }

    /// A reporter on standard output when it is a terminal (on standard error as events with
    /// `--json`); nil (quiet) otherwise.
    static func onTerminal() -> StepProgress? {
        guard events || Console.isTerminal(.output) else { return nil }
        return ProgressLine("", on: .output).reporter
    }

    func update(_ done: Int, _ total: Int) { update(step: label, done, total) }

    /// `update(step:)` as the (step, done, total) closure the engines take.
    var reporter: @Sendable (String, Int, Int) -> Void { { self.update(step: $0, $1, $2) } }

    func update(step name: String, _ done: Int, _ total: Int) {
        guard enabled, total > 0 else { return }
        if name != step {
            if !asEvents && !step.isEmpty && lastPercent < 100 { Console.write(to: stream, "\n") }
            step = name
            started = Date()
            lastPercent = -1
        }
        let percent = min(100, done * 100 / total)
        guard percent != lastPercent else { return }
        lastPercent = percent
        let elapsed = Date().timeIntervalSince(started)
        let rate = elapsed > 0.5 && done > 0 ? Double(done) / elapsed : nil
        let left = rate.map { done < total ? Double(total - done) / $0 : 0 }
        if asEvents {
            let event = Event(step: name, done: done, total: total, percent: percent, rate: rate.map { ($0 * 10).rounded() / 10 }, secondsLeft: left.map { ($0 * 10).rounded() / 10 })
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            if let data = try? encoder.encode(event) { Console.write(to: stream, String(decoding: data, as: UTF8.self) + "\n") }
            return
        }
        var line = "\r\(name): \(percent)% (\(done)/\(total))"
        if let rate {
            line += String(format: ", %.0f/s", rate)
            if done < total, let left { line += String(format: ", %.0f s left", left) }
        }
        Console.write(to: stream, line + "\u{1B}[K" + (percent == 100 ? "\n" : ""))
    }

    /// One progress event (`--json`).
    struct Event: Encodable {
        var event = "progress"
        var step: String
        var done: Int
        var total: Int
        var percent: Int
        var rate: Double?
        var secondsLeft: Double?
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
