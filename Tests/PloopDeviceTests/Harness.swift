import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopKernel
import PloopSimulator
import PloopTestSupport
import Synchronization
import Testing

/// A backend the conformance suite runs against. The in-process one always runs; the simulator and
/// the kernel backends join by adding a harness here, without copying any test.
struct Harness: Sendable, CustomTestStringConvertible {
    var name: String
    /// nil when available; else why not (printed as the skip reason).
    var unavailable: @Sendable () -> String?
    /// Makes the backend; its argument is a scratch directory for the backend's own state.
    var make: @Sendable (String) throws -> any DeviceBackend
    /// Real devices: one test at a time across the whole run.
    var exclusive = false
    /// What the backend cannot do (dm-ploop: no balloon ioctls; the top's merge and tracking not
    /// built).
    var lacks: Set<Feature> = []
    var testDescription: String { name }

    enum Feature: Sendable { case mergeTop, balloon, tracking }

    /// The backends of `all` that can do `feature`.
    static func with(_ feature: Feature) -> [Harness] { all.filter { !$0.lacks.contains(feature) } }

    static let inProcess = Harness(name: "in-process", unavailable: { nil }, make: { _ in InProcessBackend() })

    /// `KernelBackend` through a fake kernel that decodes its ioctl bytes and drives a
    /// `DeviceModel` in this process, with a sysfs tree in the scratch directory.
    static let kernelFake = Harness(
        name: "kernel (fake driver)", unavailable: { nil },
        make: { dir in KernelBackend(transport: FakeKernel(lower: InProcessBackend(), sysfsRoot: dir + "/sys"), umountTimeout: 1) })

    /// `DMPloopBackend` through a fake device-mapper that decodes its dm_ioctl bytes and serves
    /// I/O from a `DeviceModel` (issue 19: the top's merge and tracking not built yet on
    /// dm-ploop, and dm-ploop has no balloon ioctls).
    static let dmFake = Harness(
        name: "dm-ploop (fake device-mapper)", unavailable: { nil },
        make: { _ in DMPloopBackend(fake: FakeDeviceMapper()) }, lacks: [.balloon])

    /// The simulator through its real stack (FUSE, loop, /dev/ploopN), driven by the built binary.
    static let simulator = Harness(
        name: "simulator", unavailable: { TestSupport.simulatorUnavailable },
        make: { _ in SimulatorBackend(executable: TestSupport.ploopBinary) }, exclusive: true)

    /// The real ploop driver, where its module is loaded (never on the machines this project
    /// is built on so far; `scripts/kernel-smoke` walks the same ground from the command line).
    static let kernel = Harness(
        name: "kernel (real driver)", unavailable: { KernelBackend.unavailableReason() },
        make: { _ in KernelBackend() }, exclusive: true)

    /// Every backend that can run here. A backend that cannot is reported by
    /// `BackendAvailabilityTests` with the reason.
    static var all: [Harness] { [inProcess, kernelFake, dmFake, simulator, kernel].filter { $0.unavailable() == nil } }
}

/// Files for one test and the reference content of the device.
final class Bench: @unchecked Sendable {
    let dir: ScratchDirectory
    let backend: any DeviceBackend
    var device: String?
    static let cs: UInt32 = 128  // 64 KiB clusters keep images small
    static var cb: Int { Int(cs) * 512 }

    let exclusive: Bool

    init(_ h: Harness) throws {
        exclusive = h.exclusive
        if exclusive { DeviceTestLock.acquire() }
        dir = try ScratchDirectory("ploop-conf")
        backend = try h.make(dir.file(".backend"))
    }

    deinit {
        if let d = device { try? backend.umount(d) }
        if exclusive { DeviceTestLock.release() }
    }

    func path(_ name: String) -> String { dir.file(name) }

    /// A ploop1 image of `clusters` clusters with `fill` clusters written (pattern per level).
    @discardableResult
    func image(_ name: String, clusters: UInt64, fill: [UInt64] = [], tag: UInt8 = 1, version: FormatVersion = .v2) throws -> String {
        let p = path(name)
        try Offline.initialize(.init(path: p, sizeSectors: clusters * UInt64(Self.cs), clusterSectors: Self.cs, version: version))
        if !fill.isEmpty {
            let img = try Ploop1Image(file: try ImagePath.open(p, write: true), writable: true)
            for c in fill {
                let data = Pattern.cluster(c, tag: tag, size: Self.cb)
                try data.withUnsafeBytes { try img.write(cluster: ClusterIndex(c), data: $0) }
            }
            try img.close()
        }
        return p
    }

    func raw(_ name: String, clusters: UInt64, fill: [UInt64] = [], tag: UInt8 = 1) throws -> String {
        let p = path(name)
        var bytes = [UInt8](repeating: 0, count: Int(clusters) * Self.cb)
        for c in fill { bytes.replaceSubrange(Int(c) * Self.cb..<Int(c + 1) * Self.cb, with: Pattern.cluster(c, tag: tag, size: Self.cb)) }
        dir.write(name, bytes)
        return p
    }

    func mount(_ images: [String], raw: Bool = false, readOnly: Bool = false) throws -> String {
        let d = try backend.mount(MountRequest(images: images, baseFormat: raw ? .raw : .ploop1, readOnly: readOnly, clusterSectors: raw ? Self.cs : nil))
        device = d
        return d
    }

    func umount() throws {
        if let d = device { try backend.umount(d) }
        device = nil
    }

    var io: any DeviceIO { get throws { try backend.openIO(device!) } }

    func readAll() throws -> [UInt8] {
        let io = try self.io
        let size = Int(try io.sizeBytes)
        var out = [UInt8](repeating: 0, count: size)
        try out.withUnsafeMutableBytes { b in
            var off = 0
            while off < size {
                let n = min(1 << 20, size - off)
                try io.read(into: UnsafeMutableRawBufferPointer(rebasing: b[off..<off + n]), at: UInt64(off))
                off += n
            }
        }
        return out
    }

    func read(_ offset: Int, _ length: Int) throws -> [UInt8] {
        let io = try self.io
        var out = [UInt8](repeating: 0, count: length)
        try out.withUnsafeMutableBytes { try io.read(into: $0, at: UInt64(offset)) }
        return out
    }

    func write(_ bytes: [UInt8], at offset: UInt64) throws {
        let io = try self.io
        try bytes.withUnsafeBytes { try io.write($0, at: offset) }
    }

    /// Every image checks clean (forced, read-only) after umount.
    func expectClean(_ paths: [String], sourceLocation: SourceLocation = #_sourceLocation) throws {
        for p in paths where (try? ImagePath.detectFormat(ImagePath.open(p, write: false))) == .ploop1 {
            var o = Checker.Options()
            o.force = true
            o.readOnly = true
            let r = try Checker.check(path: p, options: o)
            #expect(r.status == .ok, "\(p): \(r.findings.map(\.message))", sourceLocation: sourceLocation)
        }
    }
}

/// Deterministic contents.
enum Pattern {
    static func cluster(_ c: UInt64, tag: UInt8, size: Int) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: size)
        var x = XorShift(seed: c &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(tag) &* 0xD6E8_FEB8_6659_FD93)
        for i in stride(from: 0, to: size, by: 8) {
            let v = x.next()
            withUnsafeBytes(of: v) { b.replaceSubrange(i..<min(i + 8, size), with: $0.prefix(size - i)) }
        }
        return b
    }

    static func bytes(_ n: Int, seed: UInt64) -> [UInt8] { DeviceContent.pattern(n, seed: seed) }
}

/// A plain byte array the device must equal.
struct Reference {
    var bytes: [UInt8]
    init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }
    mutating func put(_ data: [UInt8], at offset: Int) { bytes.replaceSubrange(offset..<offset + data.count, with: data) }
    mutating func putCluster(_ c: UInt64, tag: UInt8) {
        put(Pattern.cluster(c, tag: tag, size: Bench.cb), at: Int(c) * Bench.cb)
    }
    mutating func grow(to size: Int) { if size > bytes.count { bytes += [UInt8](repeating: 0, count: size - bytes.count) } }
}

/// A writer thread hammering its own range while a maintenance runs; records what it wrote.
final class Writer: @unchecked Sendable {
    let io: any DeviceIO
    let range: Range<UInt64>
    let chunk: Int
    private let stopFlag = Atomic<Bool>(false)
    private let lock = NSLock()
    private var last: [UInt64: [UInt8]] = [:]
    private var thread: Thread?
    private(set) var count = 0
    private(set) var failure: DeviceError?
    let done = DispatchSemaphore(value: 0)
    let zeros: Bool
    let discards: Bool

    /// `zeros`: a third of the writes are zeros; `discards`: a fifth of the chunks are discarded
    /// instead of written.
    init(_ io: any DeviceIO, range: Range<UInt64>, chunk: Int = 4096, zeros: Bool = false, discards: Bool = false) {
        self.io = io
        self.range = range
        self.chunk = chunk
        self.zeros = zeros
        self.discards = discards
    }

    func start(seed: UInt64) {
        let t = Thread { [self] in
            var rng = XorShift(seed: seed)
            while !stopFlag.load(ordering: .relaxed) {
                let x = rng.next()
                let slots = (range.upperBound - range.lowerBound) / UInt64(chunk)
                let at = range.lowerBound + (x % slots) * UInt64(chunk)
                let discard = discards && x % 5 == 0
                let data = discard || (zeros && x % 3 == 0) ? [UInt8](repeating: 0, count: chunk) : Pattern.bytes(chunk, seed: x)
                do {
                    if discard {
                        try io.discard(at: at, length: UInt64(chunk))
                    } else {
                        try data.withUnsafeBytes { try io.write($0, at: at) }
                    }
                } catch {
                    failure = error as? DeviceError ?? .invalid("\(error)")
                    break
                }
                lock.lock(); last[at] = data; count += 1; lock.unlock()
            }
            done.signal()
        }
        thread = t
        t.start()
    }

    func stop() {
        stopFlag.store(true, ordering: .relaxed)
        done.wait()
    }

    func apply(to ref: inout Reference) {
        lock.lock(); defer { lock.unlock() }
        for (at, data) in last { ref.put(data, at: Int(at)) }
    }
}

/// Compares two byte arrays and, when they differ, records where (not the whole arrays).
func expectSame(_ got: [UInt8], _ want: [UInt8], _ context: @autoclosure () -> String = "", sourceLocation: SourceLocation = #_sourceLocation) {
    if got == want { return }
    let n = min(got.count, want.count)
    let first = (0..<n).first { got[$0] != want[$0] } ?? n
    Issue.record("\(context()): bytes differ at \(first) (cluster \(first / Bench.cb)); sizes \(got.count) vs \(want.count)", sourceLocation: sourceLocation)
}

/// A backend that should run here and was skipped fails the run: the machine's own facts say which
/// should (root with /dev/fuse and /dev/loop-control: the simulator; a loaded ploop module: the
/// real driver), and `PLOOP_REQUIRE_BACKENDS` (comma-separated: simulator, kernel) names those a
/// CI machine must have whatever it looks like, so a CI that lost FUSE shows red instead of
/// quietly running only the in-process half of the suite.
struct BackendAvailabilityTests {
    static var required: Set<String> {
        Set((ProcessInfo.processInfo.environment["PLOOP_REQUIRE_BACKENDS"] ?? "").split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
    }

    @Test func everyBackendThatShouldRunHereRuns() {
        let names = Harness.all.map(\.name)
        #expect(names.contains(Harness.inProcess.name) && names.contains(Harness.kernelFake.name))
        let fuseHere = getuid() == 0 && access("/dev/fuse", R_OK | W_OK) == 0 && access("/dev/loop-control", R_OK | W_OK) == 0
        if fuseHere || Self.required.contains("simulator") {
            #expect(names.contains(Harness.simulator.name), "the simulator should run here but is skipped: \(Harness.simulator.unavailable() ?? "")")
        }
        if FileManager.default.fileExists(atPath: "/sys/module/ploop") || Self.required.contains("kernel") {
            #expect(names.contains(Harness.kernel.name), "the real ploop driver should run here but is skipped: \(Harness.kernel.unavailable() ?? "")")
        }
        for r in Self.required where !["simulator", "kernel"].contains(r) {
            Issue.record("PLOOP_REQUIRE_BACKENDS names \(r): the backends are simulator and kernel")
        }
    }
}
