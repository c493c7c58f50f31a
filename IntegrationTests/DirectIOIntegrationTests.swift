import Foundation
import PloopTestSupport
import Testing

/// The simulator's daemon opens image files `O_DIRECT`, as the kernel driver does: what a guest
/// writes through `/dev/ploopN` reaches the image without a copy in the host's page cache, and
/// reads back the same. `PLOOP_DIRECT_IO=0` keeps the page cache (the check can fail).
@Suite(.enabled(if: TestSupport.simulatorUnavailable == nil, "needs the simulator stack: \(TestSupport.simulatorUnavailable ?? "")"),
       .enabled(if: !PageCache.onTmpfs(NSTemporaryDirectory()), "tmpfs keeps every file in the page cache"))
struct DirectIOIntegrationTests {
    @Test(arguments: [true, false])
    func guestWritesReachTheImageWithoutTheHostsPageCache(_ direct: Bool) throws {
        try DeviceTestLock.run {
            let dir = try ScratchDirectory("ploop-dio")
            let env = direct ? [:] : ["PLOOP_DIRECT_IO": "0"]
            let image = dir.file("root.hds")
            #expect(try TestSupport.ploop("init", "--no-descriptor", "-s", "256m", image).code == 0)
            let pattern = dir.file("pattern")
            #expect(try TestSupport.sh("dd", "if=/dev/urandom", "of=\(pattern)", "bs=1M", "count=64", "status=none").code == 0)
            let sum = try TestSupport.sh("sha256sum", pattern).stdout.prefix(64)
            PageCache.drop(image)
            let m = try TestSupport.run(TestSupport.ploopBinary, ["mount", image], environment: env)
            try #require(m.code == 0, "\(m)")
            let dev = m.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            var mounted = true
            defer { if mounted { _ = try? TestSupport.ploop("umount", "-d", dev) } }
            let log = "/run/ploop/\(dev.dropFirst("/dev/".count))/daemon.log"
            let said = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            #expect(said.contains(direct ? "image I/O: direct" : "image I/O: through the page cache"), "\(said)")
            #expect(try TestSupport.sh("dd", "if=\(pattern)", "of=\(dev)", "bs=1M", "oflag=direct", "conv=fsync", "status=none").code == 0)
            // The data clusters (past the first, the header's and BAT's).
            let cached = try #require(PageCache.resident(image, offset: 1 << 20, length: 64 << 20))
            if direct {
                #expect(cached.resident < cached.pages / 20, "\(cached.resident) of \(cached.pages) data pages in the host's cache")
            } else {
                #expect(cached.resident > cached.pages / 2, "through the page cache, only \(cached.resident) of \(cached.pages) pages cached")
            }
            let back = try TestSupport.run("/bin/sh", ["-c", "dd if=\(dev) bs=1M count=64 iflag=direct status=none | sha256sum"])
            #expect(back.stdout.prefix(64) == sum, "the device reads other bytes")
            #expect(try TestSupport.ploop("umount", "-d", dev).code == 0)
            mounted = false
            let check = try TestSupport.ploop("check", image)
            #expect(check.code == 0, "\(check)")
        }
    }
}
