import Glibc
import Synchronization

/// Passes everything to another file and keeps a log of every change (write, truncate,
/// allocate, punch, sync) with its bytes, for `CrashStates` to replay. A copy is logged as the
/// write of the bytes it copied.
public final class RecordingBlockFile: BlockFile {
    public enum Change: Sendable, Equatable {
        case write(at: UInt64, bytes: [UInt8])
        case truncate(to: UInt64)
        case allocate(at: UInt64, length: UInt64)
        case punch(at: UInt64, length: UInt64)
        /// Everything before it is durable.
        case sync
    }

    public let base: any BlockFile
    private let log = Mutex<[Change]>([])
    private let shared: ChangeLog?
    public var path: String { base.path }
    public func metadataEnds(at offset: UInt64) { base.metadataEnds(at: offset) }

    /// `shared`: also log every change, with this file's path, in one order with other files'.
    public init(_ base: any BlockFile, shared: ChangeLog? = nil) {
        self.base = base
        self.shared = shared
    }

    /// What was done to the file, in order.
    public var changes: [Change] { log.withLock { $0 } }

    private func record(_ c: Change) {
        log.withLock { $0.append(c) }
        shared?.append(path, c)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(ImageError) -> Int {
        try base.read(into: buffer, at: offset)
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(ImageError) {
        try base.write(buffer, at: offset)
        record(.write(at: offset, bytes: Array(buffer)))
    }
    public func sync() throws(ImageError) {
        try base.sync()
        record(.sync)
    }
    public func truncate(to length: UInt64) throws(ImageError) {
        try base.truncate(to: length)
        record(.truncate(to: length))
    }
    public func size() throws(ImageError) -> UInt64 { try base.size() }
    public func allocate(at offset: UInt64, length: UInt64) throws(ImageError) {
        try base.allocate(at: offset, length: length)
        record(.allocate(at: offset, length: length))
    }
    public func punchHole(at offset: UInt64, length: UInt64) throws(ImageError) {
        try base.punchHole(at: offset, length: length)
        record(.punch(at: offset, length: length))
    }
    public func copy(from source: any BlockFile, at sourceOffset: UInt64, to offset: UInt64, length: Int, scratch: UnsafeMutableRawBufferPointer) throws(ImageError) {
        try base.copy(from: source, at: sourceOffset, to: offset, length: length, scratch: scratch)
        record(.write(at: offset, bytes: try base.readBytes(length, at: offset)))
    }
}

/// The changes of several files in the one order they were made (an operation that writes a
/// new delta and the image below it, say).
public final class ChangeLog: Sendable {
    public struct Entry: Sendable, Equatable {
        public var path: String
        public var change: RecordingBlockFile.Change
    }
    private let entries = Mutex<[Entry]>([])
    public init() {}
    public func append(_ path: String, _ c: RecordingBlockFile.Change) { entries.withLock { $0.append(Entry(path: path, change: c)) } }
    public var all: [Entry] { entries.withLock { $0 } }
    public var count: Int { entries.withLock { $0.count } }
}

/// The states a power cut can leave a file in, from its bytes before an operation and the log
/// of what the operation did (`RecordingBlockFile`). What a sync covered is durable; of the
/// changes since the last sync (the epoch the cut fell in), any may be lost: every prefix in
/// order, each change alone, a bounded number of random subsets (seeded, reproducible), and torn
/// writes (only the first sector of a longer write reached the disk). A truncate, an allocation
/// or a punch is done or not. Identical states are listed once.
public enum CrashStates {
    /// Random subsets per epoch or cut: `fallback` in the normal suite, more when
    /// `PLOOP_CRASH_STATES_SUBSETS` says (scripts/crash-states).
    public static func subsets(_ fallback: Int) -> Int {
        guard let v = getenv("PLOOP_CRASH_STATES_SUBSETS"), let n = Int(String(cString: v)), n >= 0 else { return fallback }
        return n
    }

    public struct State: Sendable {
        /// How the state was made, for messages ("epoch 3, prefix 2 of 5").
        public var name: String
        public var bytes: [UInt8]
        /// Changes known durable (everything through the epoch's opening sync).
        public var durableChanges: Int
    }

    public static func enumerate(
        initial: [UInt8], changes: [RecordingBlockFile.Change], randomSubsets: Int = 8, seed: UInt64 = 1, sectorSize: Int = 512
    ) -> [State] {
        var out: [State] = []
        var seen = Set<Int>()
        func emit(_ name: String, _ bytes: [UInt8], _ durable: Int) {
            var h = Hasher()
            h.combine(bytes)
            if seen.insert(h.finalize()).inserted { out.append(State(name: name, bytes: bytes, durableChanges: durable)) }
        }
        var rng = seed
        var durable = initial
        var start = 0
        var epoch = 0
        while start <= changes.count {
            let end = changes[start...].firstIndex(of: .sync) ?? changes.count
            let pending = Array(changes[start..<end])
            for i in 0...pending.count {
                emit("epoch \(epoch), the first \(i) of \(pending.count)", apply(pending[0..<i], to: durable), start)
            }
            if pending.count > 1 {
                for (j, c) in pending.enumerated() { emit("epoch \(epoch), change \(j) alone", apply([c], to: durable), start) }
                for k in 0..<randomSubsets {
                    let kept = pending.filter { _ in next(&rng) & 1 == 1 }
                    emit("epoch \(epoch), random subset \(k) (\(kept.count) of \(pending.count))", apply(kept[...], to: durable), start)
                }
            }
            for (j, c) in pending.enumerated() {
                guard case .write(let at, let bytes) = c, bytes.count > sectorSize else { continue }
                let torn = apply(pending[0..<j], to: durable)
                emit("epoch \(epoch), change \(j) torn", apply([.write(at: at, bytes: Array(bytes.prefix(sectorSize)))], to: torn), start)
            }
            durable = apply(pending[...], to: durable)
            start = end + 1
            epoch += 1
        }
        return out
    }

    /// Files after a power cut: each file that exists, with its bytes.
    public struct FilesState: Sendable {
        public var name: String
        public var files: [String: [UInt8]]
    }

    /// The states a power cut can leave several files in. A cut falls after the first T changes
    /// of the shared log, for every T. Each file then holds what its own last sync before the cut
    /// covered; its later changes (before the cut) may each be lost, independently of the other
    /// files' (each file's writeback is its own). Per cut: everything kept (a kill), only the
    /// synced parts, each file's pending changes lost alone and kept alone, the last change torn
    /// after its first sector, and `randomSubsets` random choices (seeded). A file created by the
    /// operation (absent from `initial`) exists once one of its changes is kept. Identical states
    /// are listed once.
    public static func enumerate(
        initial: [String: [UInt8]], log: [ChangeLog.Entry], randomSubsets: Int = 4, seed: UInt64 = 1, sectorSize: Int = 512
    ) -> [FilesState] {
        var out: [FilesState] = []
        var seen = Set<Int>()
        var rng = seed
        let paths = Set(initial.keys).union(log.map(\.path)).sorted()
        func emit(_ name: String, _ kept: (Int) -> RecordingBlockFile.Change?, upTo cut: Int) {
            var files: [String: [UInt8]] = [:]
            var changes: [String: [RecordingBlockFile.Change]] = [:]
            for i in 0..<cut { if let c = kept(i) { changes[log[i].path, default: []].append(c) } }
            for p in paths where initial[p] != nil || changes[p] != nil {
                files[p] = apply(changes[p] ?? [], to: initial[p] ?? [])
            }
            var h = Hasher()
            for p in paths { h.combine(p); h.combine(files[p]) }
            if seen.insert(h.finalize()).inserted { out.append(FilesState(name: name, files: files)) }
        }
        for cut in 0...log.count {
            // A change is pending at this cut if no sync of its own file follows it before the cut.
            var pending = [Bool](repeating: false, count: cut)
            var synced = Set<String>()
            for i in stride(from: cut - 1, through: 0, by: -1) {
                if log[i].change == .sync { synced.insert(log[i].path); continue }
                pending[i] = !synced.contains(log[i].path)
            }
            let all: (Int) -> RecordingBlockFile.Change? = { log[$0].change }
            emit("cut after \(cut): everything kept", all, upTo: cut)
            guard pending.contains(true) else { continue }
            emit("cut after \(cut): only what was synced", { pending[$0] ? nil : log[$0].change }, upTo: cut)
            for p in paths where (0..<cut).contains(where: { pending[$0] && log[$0].path == p }) {
                emit("cut after \(cut): \(p)'s unsynced changes lost", { pending[$0] && log[$0].path == p ? nil : log[$0].change }, upTo: cut)
                emit("cut after \(cut): only \(p)'s unsynced changes kept", { pending[$0] && log[$0].path != p ? nil : log[$0].change }, upTo: cut)
            }
            if cut > 0, pending[cut - 1], case .write(let at, let bytes) = log[cut - 1].change, bytes.count > sectorSize {
                emit("cut after \(cut): the last write torn", { $0 == cut - 1 ? .write(at: at, bytes: Array(bytes.prefix(sectorSize))) : log[$0].change }, upTo: cut)
            }
            for k in 0..<randomSubsets {
                let keep = (0..<cut).map { !pending[$0] || next(&rng) & 1 == 1 }
                emit("cut after \(cut): random subset \(k)", { keep[$0] ? log[$0].change : nil }, upTo: cut)
            }
        }
        return out
    }

    /// The bytes after `changes`, applied in order to `bytes`.
    public static func apply<C: Collection>(_ changes: C, to bytes: [UInt8]) -> [UInt8] where C.Element == RecordingBlockFile.Change {
        var b = bytes
        for c in changes { apply(c, to: &b) }
        return b
    }

    /// One change, in place. Zeros are appended as arrays, not `repeatElement`: a debug build
    /// appends those a byte at a time, and command states hold files of megabytes.
    public static func apply(_ change: RecordingBlockFile.Change, to b: inout [UInt8]) {
        func extend(to end: Int) { if end > b.count { b.append(contentsOf: [UInt8](repeating: 0, count: end - b.count)) } }
        switch change {
        case .write(let at, let data):
            let end = Int(at) + data.count
            extend(to: end)
            b.withUnsafeMutableBytes { dst in data.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: dst[Int(at)..<end]).copyMemory(from: $0) } }
        case .truncate(let length):
            if Int(length) < b.count { b.removeLast(b.count - Int(length)) } else { extend(to: Int(length)) }
        case .allocate(let at, let length):
            extend(to: Int(at + length))
        case .punch(let at, let length):
            let lo = min(Int(at), b.count), hi = min(Int(at + length), b.count)
            if lo < hi { _ = b.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[lo..<hi]).initializeMemory(as: UInt8.self, repeating: 0) } }
        case .sync:
            break
        }
    }

    /// splitmix64: reproducible without a seedable generator in the standard library.
    public static func next(_ state: inout UInt64) -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
