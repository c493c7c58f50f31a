import Foundation
import PloopSystem
import Synchronization

/// Where the commands' text goes. A process writes to its standard output and error; a command
/// run in process by `PloopMain.capture` (the tests) writes into a `Capture` bound to its task, so
/// tests running side by side keep their outputs apart. Paths come out as the bytes the user
/// typed (`RawPath`).
enum Console {
    enum Stream: Sendable { case output, error }

    final class Capture: Sendable {
        let text = Mutex<(output: [UInt8], error: [UInt8])>(([], []))
    }

    @TaskLocal static var capture: Capture?

    static func write(to stream: Stream, _ string: String) {
        let bytes = RawPath.bytes(string)
        if let capture {
            capture.text.withLock { stream == .output ? $0.output.append(contentsOf: bytes) : $0.error.append(contentsOf: bytes) }
            return
        }
        (stream == .output ? FileHandle.standardOutput : FileHandle.standardError).write(Data(bytes))
    }

    /// Whether the stream is a terminal (never while captured).
    static func isTerminal(_ stream: Stream) -> Bool { capture == nil && Host.isTerminal(stream == .output ? 1 : 2) }
}

extension PloopMain {
    /// What a command run in process printed, and its exit code.
    public struct Captured: Sendable {
        public var code: Int32
        public var standardOutput: String
        public var standardError: String
    }

    /// Runs the CLI in this process, its output captured instead of written to the process's
    /// streams. For tests of commands that need no current directory, environment or device of
    /// their own (the process shares those); the rest run the binary.
    public static func capture(_ arguments: [String]) -> Captured {
        let c = Console.Capture()
        let code = Console.$capture.withValue(c) { run(arguments) }
        let (out, err) = c.text.withLock { ($0.output, $0.error) }
        return Captured(code: code, standardOutput: String(decoding: out, as: UTF8.self), standardError: String(decoding: err, as: UTF8.self))
    }
}
