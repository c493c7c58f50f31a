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
exit(PloopMain.run(arguments))
