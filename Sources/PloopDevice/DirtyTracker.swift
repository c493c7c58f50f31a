/// The kernel's write tracker (tracker.c) as a value: dirty image-file clusters below `trackEnd`,
/// read back as byte extents in file order, wrapping around for a new pass. The kernel aborts
/// tracking when it cannot allocate a record; this set cannot run out that way, so the model never
/// aborts (ECONNABORTED, `DeviceError.aborted`, comes only from a real driver).
public struct DirtyTracker: Sendable, Equatable {
    public let clusterBytes: UInt64
    /// Bytes of the file the copier has taken so far; writes past it need no record.
    public private(set) var trackEnd: UInt64 = 0
    private var cursor: UInt64 = 0
    private var bits: [UInt64] = []

    public init(clusterBytes: Int) { self.clusterBytes = UInt64(clusterBytes) }

    public var hasDirty: Bool { bits.contains { $0 != 0 } }

    /// Records a write to file bytes [offset, offset+length).
    public mutating func record(offset: UInt64, length: UInt64) {
        guard length > 0, offset < trackEnd else { return }
        let first = offset / clusterBytes
        let last = (min(offset + length, trackEnd) - 1) / clusterBytes
        for c in first...last { set(c) }
    }

    /// TRACK_SETPOS: only forward, or back to 0 (which starts over).
    public mutating func setPosition(_ pos: UInt64) throws(DeviceError) {
        if pos == 0 {
            bits.removeAll()
            trackEnd = 0
            cursor = 0
            return
        }
        guard pos >= trackEnd else { throw .invalid("tracking position can only move forward (or back to 0)") }
        trackEnd = pos
    }

    /// TRACK_READ: the next dirty extent at or after the cursor (removed from the set); else the
    /// part of the file past `trackEnd`; else, wrapping to the start, the first dirty extent;
    /// else `nil` (EAGAIN).
    public mutating func read(fileEnd: UInt64) throws(DeviceError) -> Range<UInt64>? {
        if let r = takeRun(from: cursor / clusterBytes) {
            cursor = r.upperBound
            return r
        }
        if trackEnd < fileEnd {
            let r = trackEnd..<fileEnd
            cursor = fileEnd
            return r
        }
        if let r = takeRun(from: 0) {
            cursor = r.upperBound
            return r
        }
        return nil
    }

    private mutating func set(_ c: UInt64) {
        let w = Int(c / 64)
        if w >= bits.count { bits.append(contentsOf: repeatElement(0, count: w + 1 - bits.count)) }
        bits[w] |= 1 << (c % 64)
    }

    private func isSet(_ c: UInt64) -> Bool {
        let w = Int(c / 64)
        return w < bits.count && bits[w] & (1 << (c % 64)) != 0
    }

    /// Removes and returns the first run of dirty clusters at or after cluster `from`, in bytes.
    private mutating func takeRun(from: UInt64) -> Range<UInt64>? {
        var w = Int(from / 64)
        guard w < bits.count else { return nil }
        var mask = ~UInt64(0) << (from % 64)
        while w < bits.count {
            let word = bits[w] & mask
            if word != 0 {
                var c = UInt64(w) * 64 + UInt64(word.trailingZeroBitCount)
                let start = c
                while isSet(c) {
                    bits[Int(c / 64)] &= ~(1 << (c % 64))
                    c += 1
                }
                return start * clusterBytes..<c * clusterBytes
            }
            w += 1
            mask = ~0
        }
        return nil
    }
}
