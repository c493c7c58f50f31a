import Glibc
import PloopDevice
import PloopFormat
import PloopImage
import PloopSystem
import Testing

/// The device's maintenance operations (snapshot, merges, grow) with an I/O error (EIO, ENOSPC)
/// injected at each of their file changes in turn, the rest succeeding. The operation fails with
/// an error naming the file and the errno; the device keeps serving reads of every flushed write,
/// takes new writes, and stops cleanly; its images then pass `check` as mount runs it, and the
/// operation run again (on a device started from what it left) completes.
struct ModelFaultTests {
    typealias Op = ModelCrashTests.Op
    static let cb = ModelCrashTests.cb

    static func run(_ op: Op, on model: DeviceModel) throws(DeviceError) {
        switch op {
        case .snapshot: try model.snapshot(newDelta: "l3")
        case .mergeTop: try model.merge(levels: 1...2)
        case .mergeLower: try model.merge(levels: 0...1)
        case .mergeAll: try model.merge(levels: 0...2)
        case .grow: try model.grow(toSectors: 30000 * UInt64(ModelCrashTests.cs))
        }
    }

    @Test(arguments: Op.allCases, [false, true])
    func failedOperationLeavesAWorkingDevice(_ op: Op, _ sticky: Bool) throws {
        let files = try ModelCrashTests.template()
        let span = 48 * Self.cb
        var failed = 0
        for n in 0..<5000 {
            let errno = n % 2 == 0 ? EIO : ENOSPC
            let budget = CrashBudget(failure: .error(errno, sticky: sticky))
            let opener = MemoryOpener(wrap: { CrashingBlockFile($0, budget: budget) })
            for (p, bytes) in files { opener.add(p, MemoryBlockFile(path: p, bytes: bytes)) }
            let model = try DeviceModel(MountRequest(images: ["l0", "l1", "l2"]), opener: opener)
            let first = Pattern.bytes(3 * Self.cb, seed: 77)
            try first.withUnsafeBytes { try model.write($0, at: UInt64(Self.cb / 2)) }
            try model.flush()
            var expected = [UInt8](repeating: 0, count: span)
            try expected.withUnsafeMutableBytes { try model.read(into: $0, at: 0) }
            budget.arm(n)
            let at = "\(op), \(SystemError.words(errno))\(sticky ? " from" : " at") change \(n)"
            var completed = false
            do {
                try Self.run(op, on: model)
                completed = !budget.fired
            } catch {
                failed += 1
                let text = "\(error)"
                #expect(text.contains(SystemError.words(errno)) && ["l0", "l1", "l2", "l3"].contains { text.contains($0) }, "\(at): \(text)")
            }
            budget.disarm()
            // The device still serves what it served, and takes and keeps new writes.
            var now = [UInt8](repeating: 0, count: span)
            try now.withUnsafeMutableBytes { try model.read(into: $0, at: 0) }
            expectSame(now, expected, "\(at): reads after the failure")
            let more = Pattern.bytes(2 * Self.cb, seed: UInt64(100 + n))
            try more.withUnsafeBytes { try model.write($0, at: UInt64(20 * Self.cb)) }
            try model.flush()
            expected.replaceSubrange(20 * Self.cb..<22 * Self.cb, with: more)
            let stack = model.imagePaths
            let size = model.sizeBytes
            try model.stop()
            // The size the device served is the size its top image says once closed: a disk's
            // descriptor follows the device, and is refused when the two differ.
            let top = try Ploop1Image(file: opener.file(stack.last!)!, writable: false)
            #expect(top.virtualBytes == size, "\(at): the device served \(size) bytes, its top image says \(top.virtualBytes)")
            var mountCheck = Checker.Options()
            mountCheck.force = true
            mountCheck.dropInUse = true
            for p in stack {
                let r = try Checker.check(opener.file(p)!, options: mountCheck)
                #expect(r.status == .ok, "\(at): \(p): \(r.findings.map(\.message))")
            }
            expectSame(try ModelCrashTests.read(opener, stack, bytes: span), expected, "\(at): the stack after stop")
            if completed { break }
            // Run again on a device started from what the failure left: it completes.
            let again = try DeviceModel(MountRequest(images: stack), opener: opener)
            if op == .snapshot || stack.count == 3 {
                do { try Self.run(op, on: again) } catch { Issue.record("\(at): the re-run failed: \(error)") }
            }
            var after = [UInt8](repeating: 0, count: span)
            try after.withUnsafeMutableBytes { try again.read(into: $0, at: 0) }
            expectSame(after, expected, "\(at): after the re-run")
            try again.stop()
        }
        print("faults injected: device \(op)\(sticky ? " (sticky)" : ""): \(failed) failed")
        #expect(failed > 2)
    }
}
