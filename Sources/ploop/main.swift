import PloopCommands
import PloopSystem

#if canImport(Glibc)
import Glibc
#endif

// argv as bytes: a file name that is not UTF-8 must reach open(2) as typed (see RawPath), so the
// arguments are not taken from CommandLine.arguments, which replaces such bytes with U+FFFD.
let arguments = (1..<Int(CommandLine.argc)).map { i in
    RawPath.decode(UnsafeBufferPointer(start: UnsafeRawPointer(CommandLine.unsafeArgv[i]!).assumingMemoryBound(to: UInt8.self), count: strlen(CommandLine.unsafeArgv[i]!)))
}
// A peer that goes away (a device daemon that dies while a command talks to its control socket,
// a reader that closes our output) is an error the command reports (EPIPE), never a signal that
// ends it without a word (found when a disk command died by SIGPIPE as a daemon was killed).
Signals.ignoreBrokenPipe()
exit(PloopMain.run(arguments))
