import PloopSystem
import Foundation
import PloopFormat

/// Progress of a long step: its name, units done, units in all.
public typealias StepProgress = (String, Int, Int) -> Void

/// The ext3/ext4 file system on a disk's partition, through e2fsprogs and mount(8).
public enum FileSystem {

    /// The hidden balloon file the original creates in the file system's root.
    public static let balloonName = PloopSpec.balloonFileName
    public static let types = ["ext4", "ext3"]

    public struct MakeOptions: Sendable {
        public var type: String
        public var blockSize: Int?
        public var label: String?
        public var lazy: Bool
        public init(type: String, blockSize: Int? = nil, label: String? = nil, lazy: Bool = true) {
            self.type = type
            self.blockSize = blockSize
            self.label = label
            self.lazy = lazy
        }
    }

    /// mkfs on `partition`: stride and stripe width of one cluster (the unit the image allocates),
    /// lazy inode-table and journal initialisation unless told otherwise, no discard (a new image
    /// reads zeros already, and discarding a terabyte through the device would take long).
    public static func make(_ partition: String, options o: MakeOptions, clusterBytes: Int, progress: StepProgress? = nil) throws(VolumeError) {
        guard types.contains(o.type) else { throw VolumeError("-t \(o.type): the file system type is ext4, ext3 or none", code: VolumeError.param) }
        let block = o.blockSize ?? 4096
        let stride = max(1, clusterBytes / block)
        let lazy = o.lazy ? 1 : 0
        var args = ["-t", o.type, "-F"] + (progress == nil ? ["-q"] : []) + ["-b", "\(block)", "-E", "stride=\(stride),stripe_width=\(stride),lazy_itable_init=\(lazy),lazy_journal_init=\(lazy),nodiscard"]
        if let l = o.label { args += ["-L", l] }
        // Not quiet, mke2fs shows "Writing inode tables: 12/160" (erased with backspaces) and
        // "done" for each of its steps.
        var parser = CountParser()
        let report = progress.map { p in { (bytes: ArraySlice<UInt8>) in
            for (label, done, total) in parser.feed(bytes) { p("mke2fs: " + label, done, total) }
        } }
        try Tool.run("mke2fs", args + [partition], code: VolumeError.mkfs, output: report)
    }

    /// e2fsck: `force` checks a clean file system too; repairs what is safe to repair (-p).
    /// Exit 1 and 2 mean errors were corrected, 4 and above that some were left.
    public static func check(_ partition: String, force: Bool, progress: StepProgress? = nil) throws(VolumeError) {
        // -C 1: "pass done total" lines on stdout, turned into progress.
        var lines = LineSplitter()
        let report = progress.map { p in { (bytes: ArraySlice<UInt8>) in
            for line in lines.feed(bytes) {
                let f = line.split(separator: " ").compactMap { Int($0) }
                if f.count >= 3 { p("e2fsck pass \(f[0])", f[1], f[2]) }
            }
        } }
        let r = try Tool.status("e2fsck", (force ? ["-f"] : []) + (report != nil ? ["-C", "1"] : []) + ["-p", partition], code: VolumeError.fsck, output: report)
        guard r.status < 4 else {
            let text = (r.stdout + r.stderr).trimmingCharacters(in: .whitespacesAndNewlines)
            throw VolumeError("e2fsck found errors on \(partition) it could not repair (exit \(r.status)): \(text)\nrun 'e2fsck -f \(partition)' by hand while the disk is mounted with 'ploop mount DiskDescriptor.xml' (no -m)", code: VolumeError.fsck)
        }
    }

    /// What the superblock says (dumpe2fs -h).
    public struct Superblock: Equatable, Sendable {
        public var blockCount: UInt64
        public var blockSize: UInt64
        public var freeBlocks: UInt64
        public var inodeCount: UInt64
        public var freeInodes: UInt64
        /// Whether it has a journal (ext3, ext4): a read-only mount of a snapshot must not replay it.
        public var journaled: Bool
        public var sectors: UInt64 { blockCount * blockSize / 512 }
    }

    public static func superblock(_ partition: String) throws(VolumeError) -> Superblock {
        let r = try Tool.status("dumpe2fs", ["-h", partition], code: VolumeError.resizeFS)
        guard r.status == 0 else {
            let why = r.stderr.split(separator: "\n").last.map(String.init) ?? "exit \(r.status)"
            throw VolumeError("\(partition) holds no ext file system dumpe2fs can read (\(why))", code: VolumeError.resizeFS)
        }
        let out = r.stdout
        var fields: [String: UInt64] = [:]
        for line in out.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let key = line[..<colon].trimmingCharacters(in: .whitespaces)
            if let v = UInt64(line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)) { fields[key] = v }
        }
        guard let count = fields["Block count"], let size = fields["Block size"], let free = fields["Free blocks"],
            let inodes = fields["Inode count"], let freeInodes = fields["Free inodes"]
        else { throw VolumeError("\(partition) holds no ext file system dumpe2fs can read", code: VolumeError.resizeFS) }
        let features = out.split(separator: "\n").first { $0.hasPrefix("Filesystem features:") } ?? ""
        return Superblock(blockCount: count, blockSize: size, freeBlocks: free, inodeCount: inodes, freeInodes: freeInodes, journaled: features.contains("has_journal"))
    }

    /// The smallest size resize2fs can shrink the file system to, in sectors.
    public static func minimumSectors(_ partition: String, blockSize: UInt64) throws(VolumeError) -> UInt64 {
        let out = try Tool.run("resize2fs", ["-P", partition], code: VolumeError.resizeFS)
        guard let line = out.split(separator: "\n").first(where: { $0.contains("minimum size") }),
            let n = line.split(separator: ":").last.flatMap({ UInt64($0.trimmingCharacters(in: .whitespaces)) })
        else { throw VolumeError("resize2fs -P \(partition) gave no minimum size: \(out)", code: VolumeError.resizeFS) }
        return n * blockSize / 512
    }

    /// resize2fs to `sectors` (a whole number of file-system blocks), mounted (online) or not.
    public static func resize(_ partition: String, toSectors sectors: UInt64, progress: StepProgress? = nil) throws(VolumeError) {
        // -p: "Begin pass N (max = M)" then 40 X's as the pass goes (unmounted resizes only).
        var pass = "resize2fs"
        var marks = 0
        let report = progress.map { p in { (bytes: ArraySlice<UInt8>) in
            for b in bytes {
                if b == UInt8(ascii: "X") {
                    marks += 1
                    p(pass, min(marks, 40), 40)
                } else if b == UInt8(ascii: "\n") {
                    marks = 0
                }
            }
            if let text = String(bytes: bytes, encoding: .utf8), let r = text.range(of: "Begin pass ") {
                pass = "resize2fs pass " + String(text[r.upperBound...].prefix { $0.isNumber })
            }
        } }
        try Tool.run("resize2fs", (report != nil ? ["-p"] : []) + [partition, "\(sectors)s"], code: VolumeError.resizeFS, output: report)
    }

    public static func mount(_ source: String, at directory: String, type: String?, options: [String]) throws(VolumeError) {
        var args: [String] = []
        if let type { args += ["-t", type] }
        if !options.isEmpty { args += ["-o", options.joined(separator: ",")] }
        try Tool.run("mount", args + [source, directory], code: VolumeError.mount)
    }

    public static func umount(_ directory: String) throws(VolumeError) {
        try Tool.run("umount", [directory], code: VolumeError.umount)
    }

    /// Makes the empty hidden balloon file (mode 0600) in the root of a mounted file system.
    public static func createBalloon(in mountPoint: String) throws(VolumeError) {
        let path = mountPoint + "/" + balloonName
        do { try File(path: path, mode: .createNew, permissions: 0o600).sync() } catch {
            if error.code == .fileExists { return }
            throw VolumeError("creating \(path): \(error.message)", code: VolumeError.mkfs)
        }
    }

    /// syncfs(2) of the file system mounted at `mountPoint`: what it caches reaches the device.
    public static func sync(_ mountPoint: String) {
        try? MountedFileSystem(mountPoint).sync()
    }

    /// Every file system mounted from `device` or its partitions, synced.
    public static func syncAll(on device: String) {
        for m in Mounts.mountPoints(ofDeviceOrPartitions: device) { sync(m) }
    }

    /// Usage of a mounted file system, as df counts it (`disk info` prints it, JSON included).
    public typealias Usage = MountedFileSystem.Space

    public static func usage(_ mountPoint: String) throws(VolumeError) -> Usage {
        do { return try MountedFileSystem(mountPoint).space() } catch { throw VolumeError("statvfs \(mountPoint): \(error.message)", code: VolumeError.mount) }
    }
}

/// Complete lines out of a byte stream.
struct LineSplitter {
    var pending: [UInt8] = []
    mutating func feed(_ bytes: ArraySlice<UInt8>) -> [String] {
        var lines: [String] = []
        for b in bytes {
            if b == UInt8(ascii: "\n") {
                lines.append(String(decoding: pending, as: UTF8.self))
                pending.removeAll(keepingCapacity: true)
            } else {
                pending.append(b)
            }
        }
        return lines
    }
}

/// "Label: N/M" counters in mke2fs's output: rewritten in place with backspaces, ended by "done".
struct CountParser {
    var line: [UInt8] = []
    var last: (String, Int, Int)?

    mutating func feed(_ bytes: ArraySlice<UInt8>) -> [(String, Int, Int)] {
        var out: [(String, Int, Int)] = []
        for b in bytes {
            if b == UInt8(ascii: "\n") {
                if let e = evaluate() { out.append(e) }
                line = []
                last = nil
            } else {
                // A backspace begins rewriting the counter: what stands now is a reading.
                if b == 8, let e = evaluate() { out.append(e) }
                line.append(b)
            }
        }
        if let e = evaluate() { out.append(e) }
        return out
    }

    /// The line so far: its label, the last counter in it (all of it once "done" follows).
    mutating func evaluate() -> (String, Int, Int)? {
        let text = String(decoding: line.filter { $0 != 8 }, as: UTF8.self)
        guard let colon = text.firstIndex(of: ":") else { return nil }
        let rest = text[text.index(after: colon)...]
        var counter: (Int, Int)?
        for word in rest.split(separator: " ") {
            let parts = word.split(separator: "/")
            if parts.count == 2, let a = Int(parts[0]), let b = Int(parts[1]) { counter = (a, b) }
        }
        guard let (done, total) = counter else { return nil }
        let e = (String(text[..<colon]), rest.contains("done") ? total : done, total)
        if let l = last, l == e { return nil }
        last = e
        return e
    }
}
