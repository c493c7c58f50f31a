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
        case hole(block: UInt32)
        case leakedTail(clusters: UInt64, bytes: UInt64)
        case partialTail(bytes: UInt64)
        case emptyFlagWrong(set: Bool)
        case inUse
        case sparse(cluster: UInt64?, offset: UInt64, length: UInt64)
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
            case .hole(let b): "hole at block \(b)"
            case .leakedTail(let c, let b): "\(c) unreferenced cluster(s) at the tail (\(b) bytes): trimming tail"
            case .partialTail(let b): "\(b) bytes of a partial cluster at the tail: trimming tail"
            case .emptyFlagWrong(let set): "CIF_Empty flag is incorrect (it is \(set ? "set" : "clear"))"
            case .inUse: "dirty flag is set (image was not closed cleanly)"
            case .sparse(let c, let o, let l):
                (c.map { "cluster \($0): " } ?? "header/BAT: ") + "hole of \(l) bytes at offset \(o) (image is sparse)"
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

    /// Checks (and unless read-only, repairs) the image in `file`.
    public static func check(_ file: any BlockFile, options o: Options, holes: ((UInt64, UInt64) throws(ImageError) -> [Range<UInt64>])? = nil) throws(ImageError) -> Report {
        var report = Report(path: file.path)
        var fatal = false
        var notClean = false
        func add(_ p: Problem, _ a: Action) {
            report.findings.append(Finding(problem: p, action: a))
            if a == .fatal { fatal = true }
            if a == .skipped { notClean = true }
        }
        let size = try file.size()
        guard size >= UInt64(PloopSpec.headerSize) else {
            add(.truncatedHeader(bytes: size), .fatal)
            report.status = .formatError
            return report
        }
        let header: ImageHeader
        let headerBytes = try file.readBytes(PloopSpec.headerSize, at: 0)
        do { header = try ImageHeader.decode(headerBytes) } catch {
            add(.badHeader(error.description), .fatal)
            report.status = .formatError
            return report
        }
        report.version = header.version
        let inUse = header.inUse
        if !inUse && !o.force {
            report.status = .skipped
            return report
        }
        if inUse && header.flags.contains(.versionConvert) {
            add(.versionConverting, .fatal)
            report.status = .busy
            return report
        }
        let layout = header.layout
        let cb = UInt64(layout.clusterBytes)
        let l1 = header.firstBlockOffset / header.clusterSectors
        let batAreaEnd = UInt64(l1) * cb
        guard size >= batAreaEnd else {
            add(.batCutShort(fileBytes: size, needed: batAreaEnd), .fatal)
            report.status = .formatError
            return report
        }
        // All slots of the BAT area: those past m_Size must be zero.
        let slots = Int((batAreaEnd - UInt64(PloopSpec.headerSize)) / 4)
        var bat = [UInt32](repeating: 0, count: slots)
        try file.readBytes(slots * 4, at: UInt64(PloopSpec.headerSize)).withUnsafeBytes { b in
            for i in 0..<slots { bat[i] = b.loadLE32(at: i * 4) }
        }
        let writable = !o.readOnly
        var zeroed: [Int] = []
        func softFix(_ p: Problem, _ slot: Int) {
            if writable { zeroed.append(slot); add(p, .fixed) } else { add(p, .skipped) }
        }
        func hardFix(_ p: Problem, _ slot: Int) {
            if o.hardForce && writable { zeroed.append(slot); add(p, .fixed) } else { add(p, .fatal) }
        }
        var owner: [UInt32: UInt64] = [:]
        var allocHead = l1
        var valid = 0
        for slot in 0..<slots where bat[slot] != 0 {
            let clu = UInt64(slot)
            let entry = bat[slot]
            if slot >= Int(header.batEntries) { softFix(.slotBeyondSize(cluster: clu), slot); continue }
            let blk: UInt32
            do { blk = try layout.decode(entry).value } catch {
                hardFix(.misalignedEntry(cluster: clu, entry: entry), slot)
                continue
            }
            if blk < l1 { hardFix(.entryInHeader(cluster: clu, block: blk), slot); continue }
            if (UInt64(blk) + 1) * cb > size {
                if UInt64(blk) * cb < size {
                    hardFix(.halfWritten(cluster: clu, block: blk), slot)
                } else {
                    hardFix(.beyondEOF(cluster: clu, block: blk), slot)
                }
                continue
            }
            if let first = owner[blk] {
                add(.usedTwice(cluster: clu, block: blk, firstCluster: first), o.hardForce ? .ignored : .fatal)
                continue
            }
            owner[blk] = clu
            valid += 1
            allocHead = max(allocHead, blk + 1)
        }
        report.allocatedClusters = valid
        if o.detailed {
            for b in l1..<allocHead where owner[b] == nil { add(.hole(block: b), .reported) }
        }
        for slot in zeroed {
            var bytes = [UInt8](repeating: 0, count: 4)
            bytes.withUnsafeMutableBytes { $0.storeLE32(0, at: 0) }
            try file.writeBytes(bytes, at: UInt64(PloopSpec.headerSize) + 4 * UInt64(slot))
        }
        if !zeroed.isEmpty { try file.sync() }
        if fatal {
            report.status = .formatError
            return report
        }
        let end = UInt64(allocHead) * cb
        if size > end {
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
        var newHeader = header
        let hasData = valid > 0
        if header.flags.contains(.empty) == hasData {
            add(.emptyFlagWrong(set: header.flags.contains(.empty)), writable ? .fixed : .skipped)
            if hasData { newHeader.flags.remove(.empty) } else { newHeader.flags.insert(.empty) }
        }
        var keepInUse = false
        if inUse {
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
        if let holes {
            // Holes inside the header/BAT area or inside referenced clusters read as zeros here, but
            // the kernel's direct I/O paths expect allocated space: report, and fill with -S.
            var regions: [(UInt64?, Range<UInt64>)] = [(nil, 0..<batAreaEnd)]
            for (b, c) in owner.sorted(by: { $0.key < $1.key }) {
                regions.append((c, UInt64(b) * cb..<(UInt64(b) + 1) * cb))
            }
            for (cluster, range) in regions {
                let data = try holes(range.lowerBound, range.upperBound)
                var pos = range.lowerBound
                for r in data + [range.upperBound..<range.upperBound] {
                    if r.lowerBound > pos {
                        let p = Problem.sparse(cluster: cluster, offset: pos, length: r.lowerBound - pos)
                        if o.repairSparse && writable {
                            try file.writeZeros(at: pos, count: r.lowerBound - pos)
                            add(p, .fixed)
                        } else {
                            add(p, .reported)
                        }
                    }
                    pos = max(pos, r.upperBound)
                }
            }
            if o.repairSparse && writable { try file.sync() }
        }
        if notClean { report.status = .formatError } else if keepInUse { report.status = .inUse }
        return report
    }

    /// `ploop check` on a path: opens read-write unless `-r`, and refuses an image a running
    /// device or another ploop process holds.
    public static func check(path: String, options: Options, raw: Bool = false) throws(ImageError) -> Report {
        let file = try ImagePath.open(path, write: !options.readOnly)
        try ImagePath.lock(file, exclusive: !options.readOnly)
        if raw {
            // A raw image has no metadata to check.
            return Report(path: path)
        }
        return try check(file, options: options) { (from, to) throws(ImageError) -> [Range<UInt64>] in
            do { return try file.file.allocatedRanges(from: from, to: to) } catch let e as SystemError { throw .io(e) } catch {
                preconditionFailure()
            }
        }
    }
}
