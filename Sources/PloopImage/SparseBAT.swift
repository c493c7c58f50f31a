import PloopFormat

/// The BAT in memory, by pages of 1024 entries: a page holding only zeros is not stored, so a
/// sparse image costs memory for what it maps (plus 8 bytes a page), never for its virtual size.
/// A 32 TiB image with 32 KiB clusters has a 4 GiB BAT on disk; with one cluster written it
/// takes 8 MiB here.
struct SparseBAT: Sendable {
    static let pageShift = 10
    static let pageEntries = 1 << pageShift

    private(set) var count: Int
    private var pages: [[UInt32]?]
    /// Entries that are not zero (whatever they point at).
    private(set) var nonZero = 0

    init(count: Int) {
        self.count = count
        pages = Array(repeating: nil, count: (count + Self.pageEntries - 1) >> Self.pageShift)
    }

    subscript(i: Int) -> UInt32 {
        get { pages[i >> Self.pageShift]?[i & (Self.pageEntries - 1)] ?? 0 }
        set {
            let p = i >> Self.pageShift
            if pages[p] == nil {
                if newValue == 0 { return }
                pages[p] = [UInt32](repeating: 0, count: Self.pageEntries)
            }
            let old = pages[p]![i & (Self.pageEntries - 1)]
            pages[p]![i & (Self.pageEntries - 1)] = newValue
            nonZero += (newValue != 0 ? 1 : 0) - (old != 0 ? 1 : 0)
        }
    }

    /// More entries (zeros), for a grown image.
    mutating func grow(to newCount: Int) {
        guard newCount > count else { return }
        count = newCount
        let needed = (newCount + Self.pageEntries - 1) >> Self.pageShift
        if needed > pages.count { pages.append(contentsOf: repeatElement(nil, count: needed - pages.count)) }
    }

    /// Every non-zero entry, in index order.
    func forEachNonZero(_ body: (Int, UInt32) throws -> Void) rethrows {
        for (p, page) in pages.enumerated() {
            guard let page else { continue }
            let base = p << Self.pageShift
            for (j, e) in page.enumerated() where e != 0 && base + j < count { try body(base + j, e) }
        }
    }
}

/// Reads a BAT from its file in bounded windows (1 MiB at a time), skipping the file's holes,
/// so no offline command needs memory for a whole BAT to look at it.
enum BATScan {
    static let windowEntries = 1 << 18

    /// Calls `body` for each non-zero slot of the `count` slots that start at byte 64, in order;
    /// `progress` after each window (slots done, `count`).
    static func forEachNonZero(
        _ file: any BlockFile, count: Int, progress: ((Int, Int) -> Void)? = nil, _ body: (Int, UInt32) throws(ImageError) -> Void
    ) throws(ImageError) {
        guard count > 0 else { return }
        defer { progress?(count, count) }
        let start = UInt64(PloopSpec.headerSize)
        let end = start + 4 * UInt64(count)
        let data = try file.dataRanges(from: start, to: end)
        var window = [UInt8](repeating: 0, count: 4 * min(windowEntries, count))
        var next = 0  // first data range that may still overlap a window
        var first = 0
        while first < count {
            let n = min(windowEntries, count - first)
            let lo = start + 4 * UInt64(first)
            let hi = lo + 4 * UInt64(n)
            first += n
            if first < count { progress?(first - n, count) }
            while next < data.count, data[next].upperBound <= lo { next += 1 }
            guard next < data.count, data[next].lowerBound < hi else { continue }
            let got = try rethrowingImageError {
                try window.withUnsafeMutableBytes { b in try file.read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<4 * n]), at: lo) }
            }
            let base = first - n
            try rethrowingImageError {
                try window.withUnsafeBytes { b in
                    for i in 0..<(got / 4) {
                        let e = b.loadLE32(at: 4 * i)
                        if e != 0 { try body(base + i, e) }
                    }
                }
            }
        }
    }
}

/// One bit per block.
struct Bitmap {
    private var words: [UInt64]
    let count: Int

    init(count: Int) {
        self.count = count
        words = [UInt64](repeating: 0, count: (count + 63) / 64)
    }

    /// Out of range reads as false; out-of-range writes are ignored.
    subscript(i: Int) -> Bool {
        get { i >= 0 && i < count && words[i >> 6] & (1 << UInt64(i & 63)) != 0 }
        set {
            guard i >= 0 && i < count else { return }
            if newValue { words[i >> 6] |= 1 << UInt64(i & 63) } else { words[i >> 6] &= ~(1 << UInt64(i & 63)) }
        }
    }
}
