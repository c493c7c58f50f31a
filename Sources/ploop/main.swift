import PloopCommands

#if canImport(Glibc)
import Glibc
#endif

exit(PloopMain.run(Array(CommandLine.arguments.dropFirst())))
