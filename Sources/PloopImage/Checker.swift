import PloopFormat
import PloopSystem

/// `ploop check`: the original checker's algorithm (lib/check.c), plus the cases QEMU's parallels
/// test suite corrupts and the original misses (entries into the header/BAT area, half-written
/// last clusters), each reported with what was done about it.
public enum Checker {
    public struct Options: Sendable, Equatable {
        /// `-f`: check an image that is marked clean, too.
        public var force = false
        /// `-F`: also apply fatal fixes (zero BAT entries that point to invalid places).
        public var hardForce = false
        /// `-c`: report unreferenced blocks (holes) below the allocation head.
        public var detailed = false
        /// `-r`: never write.
        public var readOnly = false
        /// `-d`: clear the in-use mark.
        public var dropInUse = false
        /// `-S`: fill holes inside used clusters with zeros.
        public var repairSparse = false
        public init() {}
    }

    /// What was done about a problem, in the original's words.
    public enum Action: String, Sendable, Codable {
        case fixed = "Fixed"
        case skipped = "Skipped"
        case fatal = "FATAL"
        case ignored = "Ignored"
        case reported = "Reported"
    }

    public struct Finding: Sendable, Equatable, Codable {
        public var problem: Problem
        public var action: Action
        public var message: String { problem.description }
    }

    public enum Problem: Sendable, Equatable, Codable, CustomStringConvertible {
        case truncatedHeader(bytes: UInt64)
        case badHeader(String)
        case batCutShort(fileBytes: UInt64, needed: UInt64)
        case slotBeyondSize(cluster: UInt64)
        case misalignedEntry(cluster: UInt64, entry: UInt32)
        case entryInHeader(cluster: UInt64, block: UInt32)
        case beyondEOF(cluster: UInt64, block: UInt32)
        case halfWritten(cluster: UInt64, block: UInt32)
        case usedTwice(cluster: UInt64, block: UInt32, firstCluster: UInt64)
        case holes(first: UInt32, count: UInt32)
        case leakedTail(clusters: UInt64, bytes: UInt64)
        case partialTail(bytes: UInt64)
        case emptyFlagWrong(set: Bool)
        case inUse
        case sparse(block: UInt32, offset: UInt64, length: UInt64)
        case versionConverting

        public var description: String {
            switch self {
            case .truncatedHeader(let b): "header is truncated: \(b) bytes, 64 needed"
            case .badHeader(let s): s
            case .batCutShort(let f, let n): "file ends at \(f) bytes, inside the header/BAT area that ends at \(n)"
            case .slotBeyondSize(let c): "data cluster \(c) beyond block device size"
            case .misalignedEntry(let c, let e): "L2 slot \(c) corrupted: v1 entry \(e) is not cluster aligned"
            case .entryInHeader(let c, let b): "cluster \(c) points to block \(b) inside the header/BAT area"
            case .beyondEOF(let c, let b): "data cluster \(c) at block \(b) beyond EOF"
            case .halfWritten(let c, let b): "data cluster \(c) at block \(b) is cut short by EOF (half-written last cluster)"
            case .usedTwice(let c, let b, let f): "block \(b) is used more than once (clusters \(f) and \(c))"
            case .holes(let b, let n): n == 1 ? "hole at block \(b)" : "holes at blocks \(b)..\(b + n - 1) (\(n) clusters)"
            case .leakedTail(let c, let b): "\(c) unreferenced cluster(s) at the tail (\(b) bytes): trimming tail"
            case .partialTail(let b): "\(b) bytes of a partial cluster at the tail: trimming tail"
            case .emptyFlagWrong(let set): "CIF_Empty flag is incorrect (it is \(set ? "set" : "clear"))"
            case .inUse: "dirty flag is set (image was not closed cleanly)"
            case .sparse(let b, let o, let l): "block \(b): hole of \(l) bytes at offset \(o) (image is sparse)"
            case .versionConverting: "image is in the middle of a v1/v2 conversion"
            }
        }
    }

    public enum Status: String, Sendable, Codable {
        /// Nothing wrong, or everything fixed.
        case ok
        /// Clean image not checked (no `-f`).
        case skipped
        /// Problems remain (fatal, or fixes skipped because of `-r`).
        case formatError
        /// The in-use mark is set and `-d` was not given.
        case inUse
        /// The image is in a state the checker must not touch.
        case busy
    }

    public struct Report: Sendable, Codable {
        public var path: String
        public var findings: [Finding] = []
        public var status: Status = .ok
        public var version: FormatVersion?
        public var allocatedClusters = 0
        /// The exit code of the original for this outcome (SYSEXIT_*): 0, 11, 37 or 17.
        public var exitCode: Int32 {
            switch status {
            case .ok, .skipped: 0
            case .formatError: 11
            case .inUse: 37
            case .busy: 17
            }
        }
    }

    /// Checks (and unless read-only, repairs) the image in `file`, in the phases of `CheckRun`:
    /// the header, the BAT (one streamed pass), blocks two clusters share, unreferenced blocks
    /// (detailed), the tail, the header's flags, holes inside clusters.
    /// `progress` (step, done, total) follows the long passes: the BAT scan in slots, the hole
    /// scan in blocks.
    public static func check(
        _ file: any BlockFile, options o: Options, progress: Progress? = nil, holes: ((UInt64, UInt64) throws(ImageError) -> [Range<UInt64>])? = nil
    ) throws(ImageError) -> Report {
        let run = try CheckRun(file, options: o)
        run.progress = progress
        guard try run.readHeader() else { return run.report }
        try run.scanBAT()
        try run.separateSharedBlocks()
        run.report.allocatedClusters = run.valid
        if o.detailed { run.reportUnreferencedBlocks() }
        if run.zeroed > 0 { try file.sync() }
        if run.fatal {
            run.report.status = .formatError
            return run.report
        }
        try run.trimTail()
        let keepInUse = try run.rewriteHeader()
        if let holes { try run.checkHoles(holes) }
        if run.notClean { run.report.status = .formatError } else if keepInUse { run.report.status = .inUse }
        return run.report
    }

    /// A long pass's progress: its name, units done, units in all.
    public typealias Progress = (String, Int, Int) -> Void

    /// One check's state, shared by its phases.
    final class CheckRun {
        let file: any BlockFile
        let o: Options
        let size: UInt64
        var report: Report
        /// A finding no repair asked for can fix: the image is refused.
        var fatal = false
        /// A finding left as it is (read-only check): the image is not clean.
        var notClean = false
        var header: ImageHeader!
        var layout: BATLayout { header.layout }
        var cb: UInt64 { UInt64(header.layout.clusterBytes) }
        /// The first data block.
        var l1: UInt32 = 0
        var writable: Bool { !o.readOnly }
        /// One bit per block of the file: referenced by a valid entry.
        var used = Bitmap(count: 0)
        var duplicates: [(slot: Int, block: UInt32)] = []
        var allocHead: UInt32 = 0
        var valid = 0
        var zeroed = 0
        var progress: Progress?

        init(_ file: any BlockFile, options: Options) throws(ImageError) {
            self.file = file
            self.o = options
            self.size = try file.size()
            self.report = Report(path: file.path)
        }

        func add(_ p: Problem, _ a: Action) {
            report.findings.append(Finding(problem: p, action: a))
            if a == .fatal { fatal = true }
            if a == .skipped { notClean = true }
        }

        /// Reads and decodes the header; false (the report says why) when the check ends here:
        /// a cut or bad header, a clean image without `force`, a conversion under way, a BAT area
        /// the file does not hold.
        func readHeader() throws(ImageError) -> Bool {
            guard size >= UInt64(PloopSpec.headerSize) else {
                add(.truncatedHeader(bytes: size), .fatal)
                report.status = .formatError
                return false
            }
            let bytes = try file.readBytes(PloopSpec.headerSize, at: 0)
            do throws(FormatError) { header = try ImageHeader.decode(bytes) } catch {
                add(.badHeader(error.description), .fatal)
                report.status = .formatError
                return false
            }
            report.version = header.version
            if !header.inUse && !o.force {
                report.status = .skipped
                return false
            }
            if header.inUse && header.flags.contains(.versionConvert) {
                add(.versionConverting, .fatal)
                report.status = .busy
                return false
            }
            l1 = header.firstBlockOffset / header.clusterSectors
            let batAreaEnd = UInt64(l1) * cb
            guard size >= batAreaEnd else {
                add(.batCutShort(fileBytes: size, needed: batAreaEnd), .fatal)
                report.status = .formatError
                return false
            }
            return true
        }

        private func zero(_ slot: Int) throws(ImageError) {
            try file.writeBytes([0, 0, 0, 0], at: UInt64(PloopSpec.headerSize) + 4 * UInt64(slot))
            zeroed += 1
        }

        /// A slot that may be dropped without losing data (zeroed unless read-only).
        private func softFix(_ p: Problem, _ slot: Int) throws(ImageError) {
            if writable { try zero(slot); add(p, .fixed) } else { add(p, .skipped) }
        }

        /// A slot whose data is lost if dropped: only with -F.
        private func hardFix(_ p: Problem, _ slot: Int) throws(ImageError) {
            if o.hardForce && writable { try zero(slot); add(p, .fixed) } else { add(p, .fatal) }
        }

        /// Every slot of the BAT area, streamed in windows (those past m_Size must be zero). What a
        /// check keeps is one bit per block of the file, never the BAT itself.
        func scanBAT() throws(ImageError) {
            let batAreaEnd = UInt64(l1) * cb
            let slots = Int((batAreaEnd - UInt64(PloopSpec.headerSize)) / 4)
            used = Bitmap(count: Int(size / cb))
            allocHead = l1
            let entries = Int(header.batEntries)
            let batProgress = progress.map { p in { (done: Int, total: Int) in p("checking the BAT", done, total) } }
            try BATScan.forEachNonZero(file, count: slots, progress: batProgress) { (slot, entry) throws(ImageError) in
                let clu = UInt64(slot)
                if slot >= entries { try softFix(.slotBeyondSize(cluster: clu), slot); return }
                let blk: UInt32
                do { blk = try layout.decode(entry).value } catch {
                    try hardFix(.misalignedEntry(cluster: clu, entry: entry), slot)
                    return
                }
                if blk < l1 { try hardFix(.entryInHeader(cluster: clu, block: blk), slot); return }
                if (UInt64(blk) + 1) * cb > size {
                    if UInt64(blk) * cb < size {
                        try hardFix(.halfWritten(cluster: clu, block: blk), slot)
                    } else {
                        try hardFix(.beyondEOF(cluster: clu, block: blk), slot)
                    }
                    return
                }
                if used[Int(blk)] {
                    duplicates.append((slot, blk))
                    return
                }
                used[Int(blk)] = true
                valid += 1
                allocHead = max(allocHead, blk + 1)
            }
        }

        /// Blocks two clusters share: fatal, or with -F every later owner gets its own copy.
        func separateSharedBlocks() throws(ImageError) {
            guard !duplicates.isEmpty else { return }
            // Who had each shared block first: a second pass, remembering only the shared blocks.
            var firstOwner: [UInt32: UInt64] = [:]
            for d in duplicates { firstOwner[d.block] = UInt64.max }
            let layout = self.layout
            try BATScan.forEachNonZero(file, count: Int(header.batEntries)) { (slot, entry) throws(ImageError) in
                guard let b = try? layout.decode(entry).value, firstOwner[b] == UInt64.max else { return }
                firstOwner[b] = UInt64(slot)
            }
            // A repairing check gives every later owner a copy of the block (data first, then
            // the entry, each synced), so each cluster keeps the data it read before.
            var scratch = [UInt8]()
            for d in duplicates {
                let problem = Problem.usedTwice(cluster: UInt64(d.slot), block: d.block, firstCluster: firstOwner[d.block] ?? 0)
                guard o.hardForce && writable else { add(problem, .fatal); continue }
                // Past every valid block: what lies there (a leaked tail) nothing references.
                let target = ImageBlock(allocHead)
                guard layout.canEncode(target) else { add(problem, .fatal); continue }
                if scratch.isEmpty { scratch = [UInt8](repeating: 0, count: Int(cb)) }
                let (file, cb) = (self.file, self.cb)
                try rethrowingImageError {
                    try scratch.withUnsafeMutableBytes { b in
                        try file.copy(from: file, at: UInt64(d.block) * cb, to: UInt64(target.value) * cb, length: Int(cb), scratch: b)
                    }
                }
                try file.sync()
                try file.writeBytes(Checker.le32(layout.encode(target)), at: UInt64(PloopSpec.headerSize) + 4 * UInt64(d.slot))
                try file.sync()
                allocHead = target.value + 1
                valid += 1
                add(problem, .fixed)
            }
        }

        /// Unreferenced blocks below the allocation head, as ranges (a sparse image with one far
        /// cluster has millions of them).
        func reportUnreferencedBlocks() {
            var b = Int(l1)
            while b < Int(allocHead) {
                guard !used[b] else { b += 1; continue }
                var e = b
                while e < Int(allocHead), !used[e] { e += 1 }
                add(.holes(first: UInt32(b), count: UInt32(e - b)), .reported)
                b = e
            }
        }

        /// What lies past the last referenced block: cut off (a partial cluster or a leaked tail).
        func trimTail() throws(ImageError) {
            let end = UInt64(allocHead) * cb
            guard size > end else { return }
            let extra = size - end
            let problem: Problem = extra < cb ? .partialTail(bytes: extra) : .leakedTail(clusters: (extra + cb - 1) / cb, bytes: extra)
            if writable {
                try file.truncate(to: end)
                try file.sync()
                add(problem, .fixed)
            } else {
                add(problem, .skipped)
            }
        }

        /// CIF_Empty made true, the in-use mark dropped when asked; the header rewritten if either
        /// changed. Returns whether the in-use mark stays (and is reported).
        func rewriteHeader() throws(ImageError) -> Bool {
            var newHeader = header!
            let hasData = valid > 0
            if header.flags.contains(.empty) == hasData {
                add(.emptyFlagWrong(set: header.flags.contains(.empty)), writable ? .fixed : .skipped)
                if hasData { newHeader.flags.remove(.empty) } else { newHeader.flags.insert(.empty) }
            }
            var keepInUse = false
            if header.inUse {
                if o.dropInUse {
                    add(.inUse, writable ? .fixed : .skipped)
                    newHeader.inUse = false
                } else {
                    add(.inUse, .reported)
                    keepInUse = true
                }
            }
            if writable && newHeader != header {
                try file.writeBytes(newHeader.encode(), at: 0)
                try file.sync()
            }
            return keepInUse
        }

        /// Holes inside referenced clusters read as zeros here, but the kernel's direct I/O paths
        /// expect allocated space: report, and fill with -S. The header/BAT area may be a hole where
        /// it is zero (`init` leaves it so): both engines read it as zeros.
        func checkHoles(_ holes: (UInt64, UInt64) throws(ImageError) -> [Range<UInt64>]) throws(ImageError) {
            let fileBlocks = Int(size / cb)
            var b = Int(l1)
            defer { progress?("checking for holes", fileBlocks, fileBlocks) }
            while b < fileBlocks {
                guard used[b] else { b += 1; continue }
                progress?("checking for holes", b, fileBlocks)
                var e = b
                while e < fileBlocks, used[e] { e += 1 }
                var pos = UInt64(b) * cb
                let runEnd = UInt64(e) * cb
                for r in try holes(pos, runEnd) + [runEnd..<runEnd] {
                    while r.lowerBound > pos {
                        let blockEnd = (pos / cb + 1) * cb
                        let holeEnd = min(r.lowerBound, blockEnd)
                        let p = Problem.sparse(block: UInt32(pos / cb), offset: pos, length: holeEnd - pos)
                        if o.repairSparse && writable {
                            try file.writeZeros(at: pos, count: holeEnd - pos)
                            add(p, .fixed)
                        } else {
                            add(p, .reported)
                        }
                        pos = holeEnd
                    }
                    pos = max(pos, r.upperBound)
                }
                b = e
            }
            if o.repairSparse && writable { try file.sync() }
        }
    }

    /// The checker's rules, read-only, before an operation trusts an image's BAT: anything `check`
    /// would call fatal (entries into the header, past the end, misaligned, a block used twice)
    /// or a slot past the virtual size refuses the operation before it writes anything. What a
    /// crash leaves behind (a leaked or partial tail, a stale `CIF_Empty`) is not corruption.
    public static func validate(_ file: any BlockFile) throws(ImageError) {
        var o = Options()
        o.force = true
        o.readOnly = true
        let report = try check(file, options: o)
        let bad = report.findings.filter { f in
            if f.action == .fatal { return true }
            if case .slotBeyondSize = f.problem { return true }
            return false
        }
        guard let first = bad.first else { return }
        let more = bad.count > 1 ? " (and \(bad.count - 1) more problem\(bad.count > 2 ? "s" : ""))" : ""
        throw .corrupt(file.path, first.message + more)
    }

    /// The parts of sorted, disjoint `ranges` inside [from, to).
    static func clip(_ ranges: [Range<UInt64>], from: UInt64, to: UInt64) -> [Range<UInt64>] {
        var lo = 0, hi = ranges.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if ranges[mid].upperBound <= from { lo = mid + 1 } else { hi = mid }
        }
        var out: [Range<UInt64>] = []
        var i = lo
        while i < ranges.count, ranges[i].lowerBound < to {
            out.append(max(ranges[i].lowerBound, from)..<min(ranges[i].upperBound, to))
            i += 1
        }
        return out
    }

    static func le32(_ v: UInt32) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 4)
        b.withUnsafeMutableBytes { $0.storeLE32(v, at: 0) }
        return b
    }

    /// Repairs an in-use mark no live writer can hold (the caller holds the image's lock, or knows
    /// no device runs it): a crash's leftover, checked and repaired as the original's mount does,
    /// the mark dropped. Throws `.corrupt` with the findings when problems remain. Returns the
    /// report (its `.fixed` findings say what was repaired).
    @discardableResult
    public static func repairStaleMark(_ file: any BlockFile) throws(ImageError) -> Report {
        var o = Options()
        o.force = true
        o.dropInUse = true
        let report = try check(file, options: o)
        guard report.status == .ok else { throw .corrupt(file.path, report.findings.map(\.message).joined(separator: "; ")) }
        return report
    }

    /// `repairStaleMark` by path (opened read-write and locked for the repair).
    @discardableResult
    public static func repairStaleMark(path: String) throws(ImageError) -> Report {
        let file = try ImagePath.open(path, write: true)
        try ImagePath.lock(file, exclusive: true)
        return try repairStaleMark(file)
    }

    /// `ploop check` on a path: opens read-write unless `-r`, and refuses an image a running
    /// device or another ploop process holds.
    public static func check(path: String, options: Options, raw: Bool = false, progress: Progress? = nil) throws(ImageError) -> Report {
        let file = try ImagePath.open(path, write: !options.readOnly)
        try ImagePath.lock(file, exclusive: !options.readOnly)
        // An interrupted v1/v2 conversion whose staged BAT is there is finished (check is where
        // the original sends a user with a busy image).
        var finishedConversion = false
        if !raw, !options.readOnly, PathInfo.kind(Offline.conversionFile(of: path)) == .regular {
            if let h = try? readHeader(file, path), h.inUse, h.flags.contains(.versionConvert) {
                try Offline.finishVersionConversion(file)
                finishedConversion = true
            } else {
                // Staged by a conversion that never started, or left after it ended.
                PathInfo.removeRegularFile(Offline.conversionFile(of: path))
            }
        }
        if raw {
            // A raw image has no metadata to check.
            return Report(path: path)
        }
        // The file's allocated ranges once (FIEMAP), then answered per run of blocks.
        let allocated: [Range<UInt64>]
        do { allocated = try file.file.allocatedRanges(from: 0, to: UInt64.max) } catch { throw .io(error) }
        var report = try check(file, options: options, progress: progress) { (from, to) throws(ImageError) -> [Range<UInt64>] in
            Self.clip(allocated, from: from, to: to)
        }
        if finishedConversion { report.findings.insert(Finding(problem: .versionConverting, action: .fixed), at: 0) }
        return report
    }
}
