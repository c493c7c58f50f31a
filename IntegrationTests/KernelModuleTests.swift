import Foundation
import PloopTestSupport
import Testing

/// The real kernel driver: `scripts/kernel-smoke` walks the manual on it where the module is
/// loaded, and the command-level tests add it to their backends (`TestSupport.cliBackends`). The
/// same walk runs here through the fake driver, so the script itself is known to work.
@Suite(.serialized)
struct KernelModuleTests {
    static var realDriverMissing: String? {
        if !FileManager.default.fileExists(atPath: "/sys/module/ploop") {
            return "no ploop kernel module on this host (/sys/module/ploop is missing): the real-driver walk is skipped"
        }
        return geteuid() == 0 ? nil : "the real-driver walk needs root"
    }

    static func smoke(_ args: [String]) throws -> TestSupport.Result {
        let script = TestSupport.packageRoot.appendingPathComponent("scripts/kernel-smoke").path
        return try TestSupport.run(script, args, environment: ["PLOOP": TestSupport.ploopBinary])
    }

    @Test(.enabled(if: realDriverMissing == nil, "\(realDriverMissing ?? "")"))
    func manualWalkOnTheRealDriver() throws {
        try DeviceTestLock.run {
            let r = try Self.smoke([])
            #expect(r.code == 0 && r.stdout.contains("kernel-smoke: passed"), "\(r)")
        }
    }

    /// dm-ploop (ploop 8/9 hosts): the walk where device-mapper has the ploop target; elsewhere
    /// the script says it skipped and why.
    @Test func manualWalkOnDMPloopOrWhyNot() throws {
        guard geteuid() == 0 else { return }
        try DeviceTestLock.run {
            let r = try Self.smoke(["--dm"])
            #expect(r.code == 0, "\(r)")
            if r.stdout.contains("kernel-smoke --dm: skipped: ") {
                // The reason names what is missing.
                #expect(r.stdout.contains("device-mapper") || r.stdout.contains("dm-ploop"), "\(r.stdout)")
            } else {
                #expect(r.stdout.contains("kernel-smoke --dm: passed"), "\(r)")
                #expect(r.stdout.components(separatedBy: ": OK").count - 1 == 6, "\(r.stdout)")
            }
        }
    }

    @Test(.enabled(if: TestSupport.simulatorUnavailable == nil, "simulator stack unavailable: \(TestSupport.simulatorUnavailable ?? "")"))
    func manualWalkThroughTheFakeDeviceMapper() throws {
        try DeviceTestLock.run {
            let r = try Self.smoke(["--dm-fake"])
            #expect(r.code == 0 && r.stdout.contains("kernel-smoke --dm: passed"), "\(r)")
            #expect(r.stdout.components(separatedBy: ": OK").count - 1 == 6, "\(r.stdout)")
        }
    }

    @Test(.enabled(if: TestSupport.simulatorUnavailable == nil, "simulator stack unavailable: \(TestSupport.simulatorUnavailable ?? "")"))
    func manualWalkThroughTheFakeDriver() throws {
        try DeviceTestLock.run {
            let r = try Self.smoke(["--fake"])
            #expect(r.code == 0 && r.stdout.contains("kernel-smoke: passed"), "\(r)")
            // Every checksum held on both images.
            #expect(r.stdout.components(separatedBy: ": OK").count - 1 == 6, "\(r.stdout)")
        }
    }
}
