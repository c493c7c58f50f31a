import PloopCommands
import PloopTestSupport

/// The commands run in this process (`PloopMain.capture`), their output captured: no binary
/// started. For commands that need no current folder, environment or device of their own (the
/// process shares those); those, and the tests that prove a behaviour of the built binary
/// (argv bytes, signals, an older build through PLOOP_TEST_BINARY), run the binary.
enum InProcess {
    static func ploop(_ arguments: String...) -> TestSupport.Result { ploop(arguments) }

    static func ploop(_ arguments: [String]) -> TestSupport.Result {
        // A device would be served by this process's executable (the test runner), not ploop.
        precondition(
            !["mount", "tsnapshot", "__serve"].contains(arguments.first ?? "") && !(arguments.first == "init" && arguments.contains("-t")),
            "\(arguments): a command that starts a device runs the binary (TestSupport.ploop)")
        let c = PloopMain.capture(arguments)
        return TestSupport.Result(code: c.code, stdout: c.standardOutput, stderr: c.standardError)
    }
}
