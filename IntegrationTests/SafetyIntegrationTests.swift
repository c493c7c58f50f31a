import Foundation
import PloopSystem
import PloopTestSupport
import Testing

/// Issue 12 as root: ploop never unmounts, replaces or rewrites what is not its own. Every mount
/// and node made here is removed by its exact name, even on failure.
@Suite(.serialized, .enabled(if: TestSupport.simulatorUnavailable == nil, "simulator stack unavailable: \(TestSupport.simulatorUnavailable ?? "")"))
struct SafetyIntegrationTests {
    static func isMounted(_ target: String) -> Bool {
        let text = (try? String(contentsOfFile: "/proc/mounts", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").contains { $0.split(separator: " ").dropFirst().first.map(String.init) == target }
    }

    /// A tmpfs whose source is `name`, as /proc/mounts shows it; unmounted by its path at the end.
    final class FakeSourceMount {
        let dir: ScratchDirectory
        let target: String
        init(source: String) throws {
            dir = try ScratchDirectory("ploop-safety")
            target = dir.file("mnt")
            try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: false)
            let r = try TestSupport.sh("mount", "-t", "tmpfs", "-o", "size=1m", source, target)
            precondition(r.code == 0, "\(r)")
        }
        deinit {
            if SafetyIntegrationTests.isMounted(target) { _ = try? TestSupport.sh("umount", target) }
        }
    }

    @Test(arguments: [
        ("/dev/ploop917", "no ploop device /dev/ploop917"),
        ("/dev/vda-ploop-safety", "is not a ploop device name"),
    ])
    func umountTouchesNothingUntilTheDeviceIsProvenOurs(_ source: String, _ expect: String) throws {
        try DeviceTestLock.run {
            let m = try FakeSourceMount(source: source)
            let r = try TestSupport.ploop("umount", "-d", source)
            #expect(r.code == 2, "\(r)")
            #expect(r.stderr.contains(expect) && r.stderr.contains("nothing was unmounted"), "\(r)")
            #expect(Self.isMounted(m.target), "ploop umount unmounted a file system that is not a ploop device's")
        }
    }

    @Test func copyNeverReplacesADeviceNode() throws {
        let dir = try ScratchDirectory("ploop-safety")
        let node = dir.file("null")
        #expect(try TestSupport.sh("mknod", "-m", "666", node, "c", "1", "3").code == 0)
        let stream = dir.file("stream")
        _ = FileManager.default.createFile(atPath: stream, contents: Data(Self.stream))
        let r = try TestSupport.ploopLimited(["copy", "-d", node, "--replace"], input: stream)
        #expect(r.code == 4 && r.stderr.contains("is a device node, not a regular file"), "\(r)")
        #expect(PathInfo.entryKind(node) == .device)
        #expect(PathInfo.entryKind("/dev/null") == .device)
    }

    @Test func mountLeavesANodeOfAnotherDriverAlone() throws {
        try DeviceTestLock.run {
            let dir = try ScratchDirectory("ploop-safety")
            let node = "/dev/ploop917"
            guard PathInfo.entryKind(node) == .missing else { Issue.record("\(node) exists already; not touching it"); return }
            // A block node of the RAM disk driver (major 1) under a ploop name.
            #expect(try TestSupport.sh("mknod", "-m", "600", node, "b", "1", "0").code == 0)
            defer { if PathInfo.entryKind(node) == .device { unlink(node) } }
            _ = try TestSupport.ploop("init", "--no-descriptor", "-s", "16m", dir.file("a.hdd"))
            let r = try TestSupport.ploop("mount", "-d", node, dir.file("a.hdd"))
            if r.code == 0 { _ = try TestSupport.ploop("umount", "-d", node) }
            #expect(r.code == 17 && (r.stderr.contains("device node of another driver") || r.stderr.contains("not ploop's")), "\(r)")
            var st = stat()
            // Small numbers: major in bits 8..19, minor in bits 0..7.
            #expect(lstat(node, &st) == 0 && (st.st_rdev >> 8) & 0xfff == 1 && st.st_rdev & 0xff == 0, "the node was replaced")
        }
    }

    static var stream: [UInt8] {
        func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        let data = [UInt8](repeating: 7, count: 4096)
        return le(UInt32(0x4cc0_ac3d)) + le(UInt32(4096)) + le(UInt64(0)) + data + le(UInt32(0x4cc0_ac3d)) + le(UInt32(0)) + le(UInt64(0))
    }
}

/// Shutdowns that overlap (two umounts and a SIGTERM at once) end the daemon cleanly every time:
/// one of them once let the process exit while another thread was still flushing /dev/ploopN,
/// and the flush then waited forever on FUSE workers that were gone (seen once in CI).
@Suite(.serialized, .enabled(if: TestSupport.simulatorUnavailable == nil, "simulator stack unavailable: \(TestSupport.simulatorUnavailable ?? "")"))
struct OverlappingShutdownTests {
    struct State: Decodable { var pid: Int32 }

    @Test func umountsAndSignalsAtOnce() throws {
        try DeviceTestLock.run {
            let dir = try ScratchDirectory("ploop-shutdown")
            _ = try TestSupport.ploop("init", "--no-descriptor", "-s", "16m", dir.file("a.hdd"))
            for round in 0..<8 {
                let m = try TestSupport.ploop("mount", "--backend", "simulator", dir.file("a.hdd"))
                #expect(m.code == 0, "\(m)")
                let dev = m.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                guard let n = Int(dev.dropFirst("/dev/ploop".count)) else { return }
                let stateFile = (ProcessInfo.processInfo.environment["PLOOP_RUN_DIR"] ?? "/run/ploop") + "/ploop\(n)/state.json"
                let pid = try JSONDecoder().decode(State.self, from: Data(contentsOf: URL(fileURLWithPath: stateFile))).pid
                // Two umounts and a SIGTERM, all at once; each bounded in time.
                let umounts = try (0..<2).map { _ -> Process in
                    let p = Process()
                    p.executableURL = URL(fileURLWithPath: TestSupport.ploopBinary)
                    p.arguments = ["umount", "-d", dev, "--backend", "simulator"]
                    p.standardOutput = FileHandle.nullDevice
                    p.standardError = FileHandle.nullDevice
                    try p.run()
                    return p
                }
                kill(pid, SIGTERM)
                var waited = 0
                while (umounts.contains { $0.isRunning } || kill(pid, 0) == 0) && waited < 600 {
                    usleep(50_000)
                    waited += 1
                }
                let hung = umounts.contains { $0.isRunning } || kill(pid, 0) == 0
                #expect(!hung, "round \(round): the daemon or a umount did not finish in 30 s")
                if hung {
                    for p in umounts where p.isRunning { kill(p.processIdentifier, SIGKILL) }
                    kill(pid, SIGKILL)
                    return
                }
                for p in umounts { p.waitUntilExit() }
                #expect(!FileManager.default.fileExists(atPath: stateFile))
                #expect(try TestSupport.ploop("check", "-f", "-r", dir.file("a.hdd")).code == 0)
            }
        }
    }
}
