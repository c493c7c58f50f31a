import Foundation
import PloopImage
import PloopSystem

/// What a command did to a folder, from `PLOOP_TEST_RECORD`, and the folders a power cut could
/// leave. Durability as a journalling file system gives it: a file's data is durable once that
/// file is synced, and its unsynced changes may each be lost (or the last one torn); names
/// (create, rename, unlink) are durable once the folder is synced, and the unsynced ones survive
/// as a prefix, in order (the metadata journal is ordered). A file synced before its name is
/// keeps its data under whatever name survives.
public struct FolderLog {
    public enum Op: Equatable, Sendable {
        case write(UInt64, [UInt8]), sync, truncate(UInt64), allocate(UInt64, UInt64), zero(UInt64, UInt64)
        case create, rename(String), unlink

        public var isName: Bool {
            switch self {
            case .create, .rename, .unlink: true
            default: false
            }
        }
    }

    public struct Entry: Equatable, Sendable {
        /// Relative to the folder; "" is the folder itself.
        public var path: String
        public var op: Op
    }

    public var entries: [Entry] = []

    /// The records under `folder` (lock files left out: they hold no data).
    public init(_ bytes: [UInt8], folder: String) {
        var i = 0
        func u64() -> UInt64 {
            var v: UInt64 = 0
            for k in 0..<8 { v |= UInt64(bytes[i + k]) << (8 * UInt64(k)) }
            i += 8
            return v
        }
        func relative(_ p: String) -> String? {
            let std = URL(fileURLWithPath: p).standardizedFileURL.path
            if std == folder { return "" }
            guard std.hasPrefix(folder + "/") else { return nil }
            let r = String(std.dropFirst(folder.count + 1))
            return r.hasSuffix(".lck") ? nil : r
        }
        while i < bytes.count {
            let op = bytes[i]
            i += 1
            var n = 0
            for k in 0..<4 { n |= Int(bytes[i + k]) << (8 * k) }
            i += 4
            let path = String(decoding: bytes[i..<i + n], as: UTF8.self)
            i += n
            let a = u64(), b = u64(), len = Int(u64())
            let data = Array(bytes[i..<i + len])
            i += len
            guard let rel = relative(path) else { continue }
            let o: Op
            switch ChangeRecorder.Op(rawValue: op) {
            case .write: o = .write(a, data)
            case .sync: o = .sync
            case .truncate: o = .truncate(a)
            case .allocate: o = .allocate(a, b)
            case .zero: o = .zero(a, b)
            case .create: o = .create
            case .rename:
                guard let to = relative(String(decoding: data, as: UTF8.self)) else { continue }
                o = .rename(to)
            case .unlink: o = .unlink
            case nil: preconditionFailure("unknown record \(op)")
            }
            entries.append(Entry(path: rel, op: o))
        }
    }

    public struct State: Sendable {
        public var name: String
        public var files: [String: [UInt8]]
    }

    /// The folders a cut after each entry can leave, from `initial` (name → bytes).
    /// Cuts just before and after every sync and name change, at both ends, and `cutsPerRun`
    /// evenly spaced ones inside each run of data changes between them (a conversion's copy
    /// is hundreds of writes; every cut inside it differs only in how much was copied).
    public func cuts(perRun: Int) -> [Int] {
        var cuts: Set<Int> = [0, entries.count]
        for (i, e) in entries.enumerated() where e.op == .sync || e.op.isName { cuts.formUnion([i, i + 1]) }
        let bounds = cuts.sorted()
        for (a, b) in zip(bounds, bounds.dropFirst()) where b - a > 1 {
            let step = max(1, (b - a) / max(perRun, 1))
            for c in stride(from: a + step, to: b, by: step) { cuts.insert(c) }
        }
        return cuts.sorted()
    }

    public func states(initial: [String: [UInt8]], randomSubsets: Int, cutsPerRun: Int = 6, seed: UInt64 = 1) -> [State] {
        // Which file each entry is about, as the whole run resolved names.
        var names: [String: Int] = [:]
        var contents: [Int: [UInt8]] = [:]
        for (k, (p, b)) in initial.sorted(by: { $0.key < $1.key }).enumerated() {
            names[p] = k
            contents[k] = b
        }
        var nextID = initial.count
        var target: [Int] = []
        for e in entries {
            switch e.op {
            case .create:
                names[e.path] = nextID
                target.append(nextID)
                nextID += 1
            case .rename(let to):
                let id = names[e.path] ?? -2
                names[e.path] = nil
                names[to] = id
                target.append(id)
            case .unlink:
                target.append(names[e.path] ?? -2)
                names[e.path] = nil
            case .sync where e.path == "":
                target.append(-1)
            default:
                target.append(names[e.path] ?? -2)
            }
        }
        let startNames = Dictionary(uniqueKeysWithValues: initial.keys.sorted().enumerated().map { ($1, $0) })

        func build(_ cut: Int, _ kept: (Int) -> Op?) -> [String: [UInt8]] {
            var n = startNames
            var c = contents
            for i in 0..<cut {
                guard let op = kept(i) else { continue }
                let id = target[i]
                switch op {
                case .create: n[entries[i].path] = id; c[id] = c[id] ?? []
                case .rename(let to):
                    if n[entries[i].path] == id { n[entries[i].path] = nil }
                    n[to] = id
                case .unlink: if n[entries[i].path] == id { n[entries[i].path] = nil }
                case .sync: break
                case .write(let at, let bytes): CrashStates.apply(.write(at: at, bytes: bytes), to: &c[id, default: []])
                case .truncate(let len): CrashStates.apply(.truncate(to: len), to: &c[id, default: []])
                case .allocate(let at, let len): CrashStates.apply(.allocate(at: at, length: len), to: &c[id, default: []])
                case .zero(let at, let len): CrashStates.apply(.punch(at: at, length: len), to: &c[id, default: []])
                }
            }
            var out: [String: [UInt8]] = [:]
            for (p, id) in n { out[p] = c[id] ?? [] }
            return out
        }

        var out: [State] = []
        var seen = Set<Int>()
        var rng = seed
        func next() -> UInt64 { CrashStates.next(&rng) }
        func emit(_ name: String, _ cut: Int, _ kept: (Int) -> Op?) {
            let files = build(cut, kept)
            if seen.insert(Self.digest(files)).inserted { out.append(State(name: name, files: files)) }
        }
        for cut in cuts(perRun: cutsPerRun) {
            // Pending: no sync of its file (of the folder, for a name) between it and the cut.
            var pending = [Bool](repeating: false, count: cut)
            var synced = Set<Int>()
            for i in stride(from: cut - 1, through: 0, by: -1) {
                if entries[i].op == .sync { synced.insert(target[i]); continue }
                pending[i] = !synced.contains(entries[i].op.isName ? -1 : target[i])
            }
            let all: (Int) -> Op? = { entries[$0].op }
            emit("cut after \(cut)", cut, all)
            guard pending.contains(true) else { continue }
            let pendingNames = (0..<cut).filter { pending[$0] && entries[$0].op.isName }
            // Names: each prefix of the unsynced ones; data: all kept or only the synced part.
            for k in 0...pendingNames.count {
                let lost = Set(pendingNames[k...])
                emit("cut after \(cut), \(k) of \(pendingNames.count) unsynced names", cut) { lost.contains($0) ? nil : entries[$0].op }
                emit("cut after \(cut), \(k) of \(pendingNames.count) unsynced names, unsynced data lost", cut) {
                    lost.contains($0) || (pending[$0] && !entries[$0].op.isName) ? nil : entries[$0].op
                }
            }
            // Data, names all kept: each file's unsynced data lost alone; the last write torn;
            // random subsets.
            for id in Set((0..<cut).filter { pending[$0] && !entries[$0].op.isName }.map { target[$0] }).sorted() {
                emit("cut after \(cut), file \(id)'s unsynced data lost", cut) { pending[$0] && !entries[$0].op.isName && target[$0] == id ? nil : entries[$0].op }
            }
            if cut > 0, pending[cut - 1], case .write(let at, let bytes) = entries[cut - 1].op, bytes.count > 512 {
                emit("cut after \(cut), the last write torn", cut) { $0 == cut - 1 ? .write(at, Array(bytes.prefix(512))) : entries[$0].op }
            }
            for r in 0..<randomSubsets {
                let keep = (0..<cut).map { !pending[$0] || entries[$0].op.isName || next() & 1 == 1 }
                emit("cut after \(cut), random data subset \(r)", cut) { keep[$0] ? entries[$0].op : nil }
            }
        }
        return out
    }

    /// A hash of a folder's names and bytes, a word at a time (Hasher over [UInt8] goes a byte
    /// at a time, and states hold files of megabytes).
    public static func digest(_ files: [String: [UInt8]]) -> Int {
        var h = Hasher()
        for (p, b) in files.sorted(by: { $0.key < $1.key }) {
            h.combine(p)
            h.combine(b.count)
            var acc: UInt64 = 0xCBF2_9CE4_8422_2325
            b.withUnsafeBytes { raw in
                let words = raw.count / 8
                for i in 0..<words { acc = (acc ^ raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) &* 0x100_0000_01B3 &+ UInt64(i) }
                for i in (words * 8)..<raw.count { acc = (acc ^ UInt64(raw[i])) &* 0x100_0000_01B3 }
            }
            h.combine(acc)
        }
        return h.finalize()
    }

    /// A folder's regular files (lock files left out), name → bytes.
    public static func snapshot(_ folder: String) throws -> [String: [UInt8]] {
        var out: [String: [UInt8]] = [:]
        for n in try FileManager.default.contentsOfDirectory(atPath: folder) where !n.hasSuffix(".lck") {
            out[n] = Array(try Data(contentsOf: URL(fileURLWithPath: folder + "/" + n)))
        }
        return out
    }

    public static func materialize(_ files: [String: [UInt8]], at folder: String) throws {
        try? FileManager.default.removeItem(atPath: folder)
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: false)
        for (n, b) in files { try Data(b).write(to: URL(fileURLWithPath: folder + "/" + n)) }
    }
}
