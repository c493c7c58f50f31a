import ArgumentParser
import Foundation
import PloopDevice
import PloopKernel
import PloopSimulator

/// `--backend auto|dm|kernel|simulator` (or `PLOOP_BACKEND`).
enum BackendChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, dm, kernel, simulator

    /// The backend to use. `auto` is dm-ploop when device-mapper has the `ploop` target (ploop
    /// 8/9 hosts), else the legacy kernel driver when its module is loaded, else the simulator.
    func resolve() throws -> any DeviceBackend {
        let environment = ProcessInfo.processInfo.environment
        var env: BackendChoice?
        if let text = environment["PLOOP_BACKEND"], !text.isEmpty {
            guard let choice = BackendChoice(rawValue: text) else {
                throw CommandFailure("PLOOP_BACKEND=\(text) is not a backend: use auto, dm, kernel or simulator (or unset it)", code: ExitCodes.param)
            }
            env = choice
        }
        // How long umount waits for a device's holders to let go (both backends), 60 s by default.
        let umountTimeout = environment["PLOOP_UMOUNT_TIMEOUT"].flatMap(Double.init) ?? 60
        var choice = self == .auto ? (env ?? .auto) : self
        if choice == .auto {
            choice = DMPloopBackend.unavailableReason() == nil ? .dm : KernelDeviceState.module().loaded ? .kernel : .simulator
        }
        switch choice {
        case .dm:
            // A test hook: device-mapper answered by the fake, its ploop devices served by the
            // simulator's, so the whole tool can run through DMPloopBackend here.
            if environment["PLOOP_DM_FAKE"] == "simulator" {
                if let why = SimulatorBackend.unavailableReason() { throw CommandFailure("cannot serve devices here: \(why)", code: ExitCodes.device) }
                let paths = RuntimePaths()
                let lower = SimulatorBackend(paths: paths, daemonLogLevel: Verbosity.daemonLogLevel, umountTimeout: 0)
                return DMPloopBackend(transport: FakeDeviceMapper(lower: lower, stateDirectory: paths.root + "/fake-dm"), umountTimeout: umountTimeout)
            }
            if let why = DMPloopBackend.unavailableReason() { throw CommandFailure("cannot use the dm-ploop backend: \(why)", code: ExitCodes.device) }
            return DMPloopBackend(umountTimeout: umountTimeout)
        case .kernel:
            // A test hook: the kernel backend's ioctls answered by the fake driver over the
            // simulator's devices, so the whole tool can run through KernelBackend here.
            if environment["PLOOP_KERNEL_FAKE"] == "simulator" {
                if let why = SimulatorBackend.unavailableReason() { throw CommandFailure("cannot serve devices here: \(why)", code: ExitCodes.device) }
                let paths = RuntimePaths()
                return KernelBackend(transport: FakeKernel(lower: SimulatorBackend(paths: paths, daemonLogLevel: Verbosity.daemonLogLevel, umountTimeout: 0), sysfsRoot: paths.root + "/fake-kernel"), umountTimeout: umountTimeout)
            }
            if let why = KernelBackend.unavailableReason() { throw CommandFailure("cannot use the kernel backend: \(why)", code: ExitCodes.device) }
            return KernelBackend(umountTimeout: umountTimeout)
        case .simulator, .auto:
            if let why = SimulatorBackend.unavailableReason() { throw CommandFailure("cannot serve devices here: \(why)", code: ExitCodes.device) }
            return SimulatorBackend(daemonLogLevel: Verbosity.daemonLogLevel, umountTimeout: umountTimeout)
        }
    }
}

struct BackendOptions: ParsableArguments {
    @Option(help: "Device backend: auto (dm-ploop if device-mapper has the ploop target, else the legacy kernel driver if its module is loaded, else the simulator), dm, kernel or simulator. Also PLOOP_BACKEND.")
    var backend: BackendChoice = .auto
}
