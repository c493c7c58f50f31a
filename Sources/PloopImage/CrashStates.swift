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
    public var path: String { base.path }

    public init(_ base: any BlockFile) { self.base = base }

    /// What was done to the file, in order.
    public var changes: [Change] { log.withLock { $0 } }

    private func record(_ c: Change) { log.withLock { $0.append(c) } }

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

/// The states a power cut can leave a file in, from its bytes before an operation and the log
/// of what the operation did (`RecordingBlockFile`). What a sync covered is durable; of the
/// changes since the last sync (the epoch the cut fell in), any may be lost: every prefix in
/// order, each change alone, a bounded number of random subsets (seeded, reproducible), and torn
/// writes (only the first sector of a longer write reached the disk). A truncate, an allocation
/// or a punch is done or not. Identical states are listed once.
public enum CrashStates {
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

    /// The bytes after `changes`, applied in order to `bytes`.
    public static func apply<C: Collection>(_ changes: C, to bytes: [UInt8]) -> [UInt8] where C.Element == RecordingBlockFile.Change {
        var b = bytes
        for c in changes {
            switch c {
            case .write(let at, let data):
                let end = Int(at) + data.count
                if end > b.count { b += repeatElement(0, count: end - b.count) }
                b.replaceSubrange(Int(at)..<end, with: data)
            case .truncate(let length):
                if Int(length) < b.count { b.removeLast(b.count - Int(length)) } else { b += repeatElement(0, count: Int(length) - b.count) }
            case .allocate(let at, let length):
                let end = Int(at + length)
                if end > b.count { b += repeatElement(0, count: end - b.count) }
            case .punch(let at, let length):
                let lo = min(Int(at), b.count), hi = min(Int(at + length), b.count)
                if lo < hi { b.replaceSubrange(lo..<hi, with: repeatElement(0, count: hi - lo)) }
            case .sync:
                break
            }
        }
        return b
    }

    /// splitmix64: reproducible without a seedable generator in the standard library.
    static func next(_ state: inout UInt64) -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
