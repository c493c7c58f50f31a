import Foundation
import Logging
import PloopSimulator
import Synchronization

/// The original's global verbosity, taken before the command name: `ploop -v CMD` (one more than
/// the default 3), `-vvv` (the default plus the count of v), `-vN`, `-v N`, `--verbose N`, and
/// `-q` (level -1: informational lines are not printed; data, warnings and errors still are).
///
/// What each level shows here:
///   -1      errors and the data a command was asked for (`-q`)
///   0..3    also what a command did ("Storing …", "… has been successfully created"): the default
///   4       also debug lines on stderr (backend chosen, disk opened, exit code), and the simulator
///           daemon of a device mounted now logs every request to its log (see `ploop list`)
///   5+      also trace lines
public enum Verbosity {
    public static let normal = 3
    /// Bound for each command by `PloopMain.run` (a task-local value, so commands run in process
    /// side by side each keep their own).
    @TaskLocal static var current = normal

    public static var level: Int { current }

    /// The global options at the front of `arguments`, and what is left (the command and its
    /// arguments). A wrong one is a usage error, as in the original.
    public static func take(_ arguments: [String]) throws(CommandFailure) -> (level: Int, rest: [String]) {
        var level = normal
        var i = 0
        func number(_ s: String, _ option: String) throws(CommandFailure) -> Int {
            guard let n = Int(s), n >= -1 else {
                throw CommandFailure("\(option): the verbosity is a number from -1 (quiet) up; 3 is the default (see 'ploop --help')", code: ExitCodes.param)
            }
            return n
        }
        while i < arguments.count {
            let a = arguments[i]
            if a == "-q" || a == "--quiet" {
                level = -1
            } else if a == "-v" {
                // `-v N` when a number follows (the form); the original's `-v` alone adds one.
                if i + 1 < arguments.count, let n = Int(arguments[i + 1]), n >= -1 {
                    level = n
                    i += 1
                } else {
                    level += 1
                }
            } else if a.hasPrefix("-vv"), a.dropFirst().allSatisfy({ $0 == "v" }) {
                level += a.count - 1
            } else if a.hasPrefix("-v") {
                level = try number(String(a.dropFirst(2)), a)
            } else if a == "--verbose" {
                guard i + 1 < arguments.count else { throw CommandFailure("--verbose needs a level, as in 'ploop --verbose 4 list'", code: ExitCodes.param) }
                level = try number(arguments[i + 1], "--verbose \(arguments[i + 1])")
                i += 1
            } else if a.hasPrefix("--verbose=") {
                level = try number(String(a.dropFirst("--verbose=".count)), a)
            } else {
                break
            }
            i += 1
        }
        return (level, Array(arguments[i...]))
    }

    /// Runs `body` at `level`.
    static func with<T>(_ level: Int, _ body: () -> T) -> T { $current.withValue(level, operation: body) }

    /// What a daemon started by this command (mount) logs: the same detail at 4 and up.
    static var daemonLogLevel: String? { level >= 5 ? "trace" : level >= 4 ? "debug" : nil }

    static var logLevel: Logger.Level {
        switch level {
        case ...(-1): .error
        case 0...3: .notice
        case 4: .debug
        default: .trace
        }
    }
}

/// The CLI's log: stderr, one line each, with a UTC timestamp and the level.
let log: Logger = Logger(label: "ploop") { _ in ConsoleLogHandler() }

struct ConsoleLogHandler: LogHandler {
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level {
        get { Verbosity.logLevel }
        set {}
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var all = metadata
        if let m = event.metadata { all.merge(m) { $1 } }
        let extra = all.isEmpty ? "" : " " + all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        Console.write(to: .error, "\(Self.timestamp()) \(event.level) ploop: \(event.message)\(extra)\n")
    }

    /// UTC, to the microsecond: 2026-12-03T10:40:00.123456Z.
    static func timestamp() -> String {
        let now = Date().timeIntervalSince1970
        let seconds = now.rounded(.down)
        var utc = Calendar(identifier: .gregorian)
        utc.timeZone = TimeZone(identifier: "UTC")!
        let c = utc.dateComponents([.year, .month, .day, .hour, .minute, .second], from: Date(timeIntervalSince1970: seconds))
        return String(
            format: "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", c.year!, c.month!, c.day!, c.hour!, c.minute!, c.second!,
            min(999_999, Int((now - seconds) * 1_000_000)))
    }
}

/// A line saying what a command did: printed at the default verbosity, not with `-q`.
func say(_ text: String) {
    if Verbosity.level >= 0 { print(text) }
}
