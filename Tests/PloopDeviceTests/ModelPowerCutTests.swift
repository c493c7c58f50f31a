import PloopDevice
import PloopFormat
import PloopImage
import Testing

/// The device's snapshot, merges and online grow under a power cut: every change of every file
/// is recorded in one order (`ChangeLog`) and `CrashStates.enumerate(initial:log:)` builds what a
/// cut can leave, with unsynced changes lost, kept or torn per file. In every state each image
/// passes `check` as mount runs it, the stack as it was before the operation reads every write
/// flushed before it, and a new delta that has its header stacks on top without changing a byte.
struct ModelPowerCutTests {
    static let cb = ModelCrashTests.cb
    static let mountCheck: Checker.Options = {
        var o = Checker.Options()
        o.force = true
        o.dropInUse = true
        return o
    }()

    @Test(arguments: ModelCrashTests.Op.allCases)
    func everyPowerCutStateKeepsTheOldStack(_ op: ModelCrashTests.Op) throws {
        let log = ChangeLog()
        let opener = MemoryOpener(wrap: { RecordingBlockFile($0, shared: log) })
        for (p, bytes) in try ModelCrashTests.template() { opener.add(p, MemoryBlockFile(path: p, bytes: bytes)) }
        let model = try DeviceModel(MountRequest(images: ["l0", "l1", "l2"]), opener: opener)
        let data = Pattern.bytes(3 * Self.cb, seed: 77)
        try data.withUnsafeBytes { try model.write($0, at: UInt64(Self.cb / 2)) }
        try model.flush()
        let span = 48 * Self.cb
        var expected = [UInt8](repeating: 0, count: span)
        try expected.withUnsafeMutableBytes { try model.read(into: $0, at: 0) }
        // Everything so far was flushed: the operation's changes start from these bytes.
        var initial: [String: [UInt8]] = [:]
        for p in opener.paths { initial[p] = opener.file(p)!.contents }
        let start = log.count
        try ModelFaultTests.run(op, on: model)
        let changes = Array(log.all[start...])
        let newStack = model.imagePaths
        let states = CrashStates.enumerate(initial: initial, log: changes, randomSubsets: CrashStates.subsets(4), seed: 31)
        var checked = 0
        for state in states {
            let at = "\(op), \(state.name)"
            let o = MemoryOpener()
            for (p, bytes) in state.files { o.add(p, MemoryBlockFile(path: p, bytes: bytes)) }
            for (p, _) in state.files.sorted(by: { $0.key < $1.key }) {
                let f = o.file(p)!
                // A new delta cut before its header was synced is no image yet: the stack never
                // named it (the caller records it only after the snapshot returns).
                if initial[p] == nil, (try? Ploop1Image(file: f, writable: false)) == nil { continue }
                let r = try Checker.check(f, options: Self.mountCheck)
                #expect(r.status == .ok, "\(at): \(p): \(r.findings.map(\.message))")
            }
            expectSame(try ModelCrashTests.read(o, ["l0", "l1", "l2"], bytes: span), expected, "\(at): the old stack")
            if op == .snapshot, let f = o.file("l3"), (try? Ploop1Image(file: f, writable: false)) != nil {
                expectSame(try ModelCrashTests.read(o, ["l0", "l1", "l2", "l3"], bytes: span), expected, "\(at): the stack with the new delta")
            }
            checked += 1
        }
        // Everything kept: the stack the operation left reads the same.
        let final = MemoryOpener()
        for p in Set(initial.keys).union(changes.map(\.path)) {
            let f = MemoryBlockFile(path: p, bytes: CrashStates.apply(changes.filter { $0.path == p }.map(\.change), to: initial[p] ?? []))
            final.add(p, f)
            #expect(try Checker.check(f, options: Self.mountCheck).status == .ok, "\(op): \(p) with every change")
        }
        expectSame(try ModelCrashTests.read(final, newStack, bytes: span), expected, "\(op): the new stack with every change")
        #expect(changes.count > 3 && checked == states.count)
        print("power-cut states: device \(op): \(states.count) from \(changes.count) changes")
    }
}
