import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopSystem

/// A disk as ploop users manage it: a folder holding DiskDescriptor.xml and its deltas. An open
/// `Disk` holds `DiskDescriptor.xml.lck` (flock) until it goes away; every change of the
/// descriptor is written to `DiskDescriptor.xml.tmp`, synced, renamed over the descriptor, and
/// the folder synced.
///
/// Operations that change images and the descriptor together first write a journal
/// (`DiskDescriptor.xml.journal`): the files whose fate depends on which descriptor survives,
/// and, for merges, the merge and the descriptor that follows it. The next `Disk.open` finishes
/// what a crash interrupted: a journalled merge is run again (merges are idempotent) and its
/// descriptor committed; then every journalled file the descriptor does not name is removed. So
/// after a kill at any step the disk is the old one or the new one, and the next command on it
/// completes or rolls back the interrupted one.
public final class Disk {
    public static let descriptorName = "DiskDescriptor.xml"

    public let descriptorPath: String
    public let folder: String
    public private(set) var descriptor: DiskDescriptor
    /// The operation a crash interrupted and `open` completed (its journal's `operation`), if any:
    /// a command asked to do it again can say it is done.
    public internal(set) var finishedOperation: String?
    private let lock: File
    let say: (String) -> Void
    /// The devices, for operations on a running disk and for recovering an interrupted one (the
    /// one `open` was given, so a command asks the same backend again without resolving it twice).
    public let backend: (any DeviceBackend)?

    // MARK: - Finding and opening

    /// The descriptor an argument names: `DIR/DiskDescriptor.xml`, or `DIR` holding one. Nil when
    /// the argument is neither (an image path, say).
    public static func descriptorPath(for argument: String) -> String? {
        let absolute = absolutePath(argument)
        if PathInfo.kind(absolute) == .directory {
            let p = absolute + "/" + descriptorName
            return PathInfo.kind(p) == .missing ? nil : p
        }
        return (absolute as NSString).lastPathComponent == descriptorName ? absolute : nil
    }

    static func absolutePath(_ p: String) -> String {
        let joined = p.hasPrefix("/") ? p : FileManager.default.currentDirectoryPath + "/" + p
        return normalize(joined)
    }

    /// `.` and `..` resolved lexically, repeated slashes folded.
    static func normalize(_ p: String) -> String {
        var parts: [Substring] = []
        for c in p.split(separator: "/", omittingEmptySubsequences: true) {
            if c == "." { continue }
            if c == ".." { if !parts.isEmpty { parts.removeLast() }; continue }
            parts.append(c)
        }
        return "/" + parts.joined(separator: "/")
    }

    /// Opens and locks the disk at `descriptorPath`, finishes an interrupted operation, reads and
    /// checks the descriptor (its tree, and the chain's files against their headers).
    /// `backend`, when given, is asked which device runs the disk (online operations, and
    /// recovering one a crash interrupted); without it, a disk with an interrupted online
    /// operation is refused (nothing can say what its device runs).
    public static func open(_ descriptorPath: String, lockTimeout: Double? = nil, backend: (any DeviceBackend)? = nil, say: @escaping (String) -> Void = { _ in }) throws(DiskError) -> Disk {
        let disk = try locked(descriptorPath, lockTimeout: lockTimeout, backend: backend, say: say)
        try disk.recover()
        try disk.checkFiles()
        return disk
    }

    /// Opens and locks the disk as it is, finishing nothing and writing nothing (for `check -r`):
    /// `pendingOperation` says whether a command left one unfinished. The descriptor's files are
    /// checked only when none is (an unfinished grow has images bigger than the descriptor says).
    public static func openAsIs(_ descriptorPath: String, lockTimeout: Double? = nil) throws(DiskError) -> Disk {
        let disk = try locked(descriptorPath, lockTimeout: lockTimeout, backend: nil, say: { _ in })
        if disk.pendingOperation() == nil { try disk.checkFiles() }
        return disk
    }

    private static func locked(_ descriptorPath: String, lockTimeout: Double?, backend: (any DeviceBackend)?, say: @escaping (String) -> Void) throws(DiskError) -> Disk {
        let path = absolutePath(descriptorPath)
        guard PathInfo.kind(path) == .regular else {
            if PathInfo.kind(path) == .missing { throw .noDescriptor(path) }
            throw .unreadable(path, "it is not a regular file")
        }
        let lock = try Self.takeLock(path, timeout: lockTimeout)
        return try Disk(path: path, lock: lock, descriptor: try Self.read(path), backend: backend, say: say)
    }

    init(path: String, lock: File, descriptor: DiskDescriptor, backend: (any DeviceBackend)?, say: @escaping (String) -> Void) throws(DiskError) {
        self.backend = backend
        self.descriptorPath = path
        self.folder = (path as NSString).deletingLastPathComponent
        self.lock = lock
        self.descriptor = descriptor
        self.say = say
    }

    static func read(_ path: String) throws(DiskError) -> DiskDescriptor {
        guard let data = FileManager.default.contents(atPath: path) else { throw .unreadable(path, "permission denied or I/O error") }
        return try DiskDescriptor.parse(data, path: path)
    }

    /// `DiskDescriptor.xml.lck`, flocked exclusively; waits up to `timeout` seconds (default 60,
    /// as the original; `PLOOP_LOCK_TIMEOUT` overrides) and then names the holder if /proc/locks
    /// tells it.
    static func takeLock(_ descriptorPath: String, timeout: Double?) throws(DiskError) -> File {
        let lockPath = descriptorPath + ".lck"
        let f: File
        do { f = try File(path: lockPath, mode: .createOrOpen, permissions: 0o644) } catch { throw .io("cannot open the lock \(lockPath): \(error.message)") }
        let limit = timeout ?? ProcessInfo.processInfo.environment["PLOOP_LOCK_TIMEOUT"].flatMap(Double.init) ?? 60
        let start = Date()
        while true {
            let ok: Bool
            do { ok = try f.tryLock(.exclusive) } catch { throw .io("cannot lock \(lockPath): \(error.message)") }
            if ok { return f }
            if Date().timeIntervalSince(start) >= limit { throw .locked(descriptorPath, holder: lockHolder(of: f)) }
            Host.pause(milliseconds: 50)
        }
    }

    /// The process holding a flock on `file`, from /proc/locks (matched by inode).
    static func lockHolder(of file: File) -> Int32? {
        guard let inode = file.identity?.inode, let text = try? String(contentsOfFile: "/proc/locks", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 6, f[1] == "FLOCK", let pid = Int32(f[4]) else { continue }
            let id = f[5].split(separator: ":")
            if id.count == 3, UInt64(id[2]) == inode, pid != Host.processID { return pid }
        }
        return nil
    }

    // MARK: - Files

    /// The absolute path of an image's file. A relative `File` may climb out of the folder only
    /// with leading `../` (as the original writes it); `sub/../x` is refused when the descriptor
    /// is read (`checkFiles`).
    public func path(of g: GUID) -> String {
        guard let i = descriptor.image(g) else { return "" }
        return resolve(i.file)
    }

    func resolve(_ file: String) -> String { Self.resolve(file, in: folder) }

    /// A descriptor's `File` as a path: absolute as it is, else relative to the descriptor's folder.
    public static func resolve(_ file: String, in folder: String) -> String {
        file.hasPrefix("/") ? normalize(file) : normalize(folder + "/" + file)
    }

    /// How the descriptor names `path`: relative to the folder, `../` where it lies elsewhere.
    func relative(_ path: String) -> String { Self.relative(path, to: folder) }

    static func relative(_ path: String, to folder: String) -> String {
        let target = normalize(path).split(separator: "/")
        let base = folder.split(separator: "/")
        var common = 0
        while common < min(target.count - 1, base.count), target[common] == base[common] { common += 1 }
        let up = Array(repeating: "..", count: base.count - common)
        return (up + target[common...].map(String.init)).joined(separator: "/")
    }

    static func fileIsTidy(_ file: String) -> Bool {
        if file.hasPrefix("/") { return !file.split(separator: "/").contains { $0 == ".." || $0 == "." } }
        var climbing = true
        for c in file.split(separator: "/", omittingEmptySubsequences: false) {
            if c == ".." { if !climbing { return false }; continue }
            climbing = false
            if c.isEmpty || c == "." { return false }
        }
        return !climbing
    }

    /// Every `File` tidy; every image of the running chain present, of the descriptor's cluster
    /// size, and the top of the descriptor's size.
    func checkFiles() throws(DiskError) {
        for i in descriptor.images where !Self.fileIsTidy(i.file) {
            throw .invalid(descriptorPath, element: "File", "\"\(i.file)\" of image \(i.guid) climbs through '..' or '.' inside the path (the original never writes that; it resolves it to the wrong folder)")
        }
        let chain = descriptor.chain()
        for (n, g) in chain.enumerated() {
            let i = descriptor.image(g)!
            let p = path(of: g)
            guard PathInfo.kind(p) == .regular else {
                throw .invalid(descriptorPath, element: "File", "\(i.file) of image \(g) " + (PathInfo.kind(p) == .missing ? "does not exist" : "is not a regular file"))
            }
            let info = try imageErrors { () throws(ImageError) in try ImageInfo.read(path: p) }
            if i.kind == .plain {
                guard info.format == .raw else {
                    throw .invalid(descriptorPath, element: "Type", "is Plain (a raw disk) but the base \(i.file) is a ploop1 image: write Compressed for every image")
                }
                continue
            }
            guard info.format == .ploop1 else { throw .invalid(descriptorPath, element: "Type", "of \(g) is Compressed but \(i.file) is not a ploop1 image") }
            if let cs = info.clusterSize, cs / 512 != Int(descriptor.blocksize) {
                throw .invalid(descriptorPath, element: "Blocksize", "is \(descriptor.blocksize) sectors but \(i.file) has clusters of \(cs / 512)")
            }
            if n == 0, info.virtualSize / 512 != descriptor.diskSizeSectors {
                throw .invalid(descriptorPath, element: "Disk_size", "is \(descriptor.diskSizeSectors) sectors but the top image \(i.file) is \(info.virtualSize / 512)")
            }
        }
    }

    /// The chain's files, base first, from the top (or from `upTo`) down.
    public func chainPaths(from g: GUID? = nil) -> [String] { descriptor.chain(from: g).reversed().map { path(of: $0) } }

    public var baseFormat: ImageFormat { descriptor.image(descriptor.base!)!.kind == .plain ? .raw : .ploop1 }

    // MARK: - Writing the descriptor

    /// Writes `new` atomically (tmp, fsync, rename, fsync the folder) and takes it as current.
    public func commit(_ new: DiskDescriptor) throws(DiskError) {
        try Self.write(new, to: descriptorPath, replace: true)
        descriptor = new
    }

    static func write(_ d: DiskDescriptor, to path: String, replace: Bool) throws(DiskError) {
        do { try PathInfo.writeAtomically(Array(d.xml().utf8), to: path, replace: replace, permissions: 0o644) } catch {
            if case .exists = error { throw .alreadyExists(path) }
            throw .io("writing \(path): \(error)")
        }
    }

    // MARK: - The journal

    struct Journal: Codable {
        var operation: String
        /// Files whose fate the surviving descriptor decides: kept if it names them.
        var files: [String]
        /// A merge to redo before `descriptor` is committed.
        var merge: Merge?
        /// A grow of every image of the chain to redo (sectors) before `descriptor` is committed.
        var grow: UInt64?
        /// A resize (down) of every image of the chain to redo (sectors) before `descriptor`.
        var resize: UInt64?
        /// A finished file to rename over an image (a layout conversion) before `descriptor` is
        /// committed; when it is gone, the rename was done.
        var publish: Publish?
        /// The device an online operation ran on: recovery asks it what it runs now.
        var device: String?
        var descriptor: String?

        struct Publish: Codable {
            var from: String
            var to: String
        }

        struct Merge: Codable {
            var sources: [String]
            var destination: String
            var raw: Bool
        }
    }

    var journalPath: String { descriptorPath + ".journal" }

    func writeJournal(_ j: Journal) throws(DiskError) {
        let bytes: [UInt8]
        do { bytes = Array(try JSONEncoder().encode(j)) } catch { throw .io("encoding \(journalPath): \(error)") }
        do { try PathInfo.writeAtomically(bytes, to: journalPath, replace: true) } catch { throw .io("writing \(journalPath): \(error)") }
    }

    /// Runs a journalled operation: writes `j`, runs `body` (which commits the new descriptor at
    /// its end and names each step it enters through `step`), then ends the journal. A failure is
    /// reported with the step it stopped in. An operation that only adds files (a snapshot, a
    /// switch, deleting a leaf) is undone at once; one that had begun to change images (a merge,
    /// a resize, a layout's rename) or a device leaves its journal for the next command.
    func journalled(_ j: Journal, _ body: (_ step: (String) -> Void) throws(DiskError) -> Void) throws(DiskError) {
        var current = "writing its journal"
        do throws(DiskError) {
            try writeJournal(j)
            current = "starting"
            try body { current = $0 }
        } catch {
            let undoable = j.merge == nil && j.grow == nil && j.resize == nil && j.publish == nil && j.device == nil
            if undoable && PathInfo.kind(journalPath) == .regular { endJournal(j) }
            let left: DiskError.Left = PathInfo.kind(journalPath) == .regular ? .pending : .undone
            throw .stopped(descriptorPath, operation: j.operation, step: current, cause: error, left: left)
        }
        endJournal(j)
    }

    /// Removes the journalled files the descriptor no longer names, then the journal. A file that
    /// cannot be removed (an I/O error) keeps the journal, so the next command tries again; the
    /// operation itself is done, so this is a warning, not a failure.
    func endJournal(_ j: Journal) {
        // The merge is done (or was finished here): its destination holds every cluster.
        if let m = j.merge { PathInfo.removeRegularFile(Offline.reverseMergeMarker(of: m.destination)) }
        var left: [String] = []
        for f in j.files {
            // A delta being built when the process died is still under its temporary name (an
            // offline init's, or a device snapshot's).
            TemporaryFile.removeStale(of: f, suffix: "init")
            TemporaryFile.removeStale(of: f, suffix: ImagePath.newImageSuffix)
            if !references(f) && !PathInfo.removeRegularFile(f) && PathInfo.entryKind(f) == .regular { left.append(f) }
        }
        guard left.isEmpty else {
            say("warning: cannot remove \(left.joined(separator: ", ")), which the disk no longer uses; the next command on the disk tries again (or remove it by hand)")
            return
        }
        if !PathInfo.removeRegularFile(journalPath) && PathInfo.entryKind(journalPath) == .regular {
            say("warning: cannot remove \(journalPath) (the operation is done); the next command on the disk removes it")
        }
        PathInfo.syncParentDirectory(of: journalPath)
    }

    /// What a crash (or a failure) left unfinished on this disk, in words ("an interrupted
    /// snapshot-merge top: the disk reads as before it"); nil when nothing is. Only looks.
    public func pendingOperation() -> String? {
        for i in descriptor.images where i.kind == .compressed {
            let p = resolve(i.file)
            if PathInfo.kind(Offline.conversionFile(of: p)) == .regular { return "a version conversion of \(i.file) may be under way" }
        }
        guard PathInfo.kind(journalPath) == .regular else { return nil }
        guard let data = FileManager.default.contents(atPath: journalPath), let j = try? JSONDecoder().decode(Journal.self, from: data) else {
            return "\(journalPath) is damaged"
        }
        if let text = j.descriptor, (try? DiskDescriptor.parse(Data(text.utf8), path: journalPath)) == descriptor {
            return "the clean-up of an interrupted \(j.operation) is left (the disk reads as after it)"
        }
        return "an interrupted \(j.operation) is pending (the disk reads as before it)"
    }

    func references(_ file: String) -> Bool {
        descriptor.images.contains { resolve($0.file) == Self.normalize(file) }
    }

    /// Finishes what a crash interrupted (see the type's comment).
    func recover() throws(DiskError) {
        // Half-written temporaries are never worth keeping: the rename that would publish them
        // did not happen.
        PathInfo.removeRegularFile(descriptorPath + ".tmp")
        PathInfo.removeRegularFile(journalPath + ".tmp")
        // Version conversions: finished where the image says one is under way, else the staged
        // BAT of one that never started is dropped.
        for i in descriptor.images where i.kind == .compressed {
            let p = resolve(i.file)
            let staged = Offline.conversionFile(of: p)
            PathInfo.removeRegularFile(staged + ".tmp")
            guard PathInfo.kind(staged) == .regular else { continue }
            let busy = (try? ImagePath.open(p, write: false)).flatMap { f in try? ImageHeader.decode(f.readBytes(PloopSpec.headerSize, at: 0)) }
                .map { $0.inUse && $0.flags.contains(.versionConvert) } ?? false
            if busy {
                say("finishing an interrupted version conversion of \(p)")
                let f = try imageErrors { () throws(ImageError) in try ImagePath.open(p, write: true) }
                try imageErrors { () throws(ImageError) in try Offline.finishVersionConversion(f) }
            } else {
                PathInfo.removeRegularFile(staged)
            }
        }
        guard PathInfo.kind(journalPath) == .regular else {
            // A layout conversion that never reached its journal left only its staged file.
            for i in descriptor.images { PathInfo.removeRegularFile(Self.layoutFile(of: resolve(i.file))) }
            return
        }
        guard let data = FileManager.default.contents(atPath: journalPath), let j = try? JSONDecoder().decode(Journal.self, from: data) else {
            throw .io("\(journalPath) is damaged: read it, finish or undo its operation by hand, then remove it")
        }
        let next = try j.descriptor.map { (text) throws(DiskError) in try DiskDescriptor.parse(Data(text.utf8), path: journalPath) }
        if let device = j.device, let next, try recoverOnline(j, device: device, next: next) {
            endJournal(j)
            return
        }
        if let next, next == descriptor {
            // The new descriptor was committed: only the clean-up was left.
            say("finishing an interrupted \(j.operation): only its clean-up was left")
            finishedOperation = j.operation
        } else if let p = j.publish, let next {
            say("finishing an interrupted \(j.operation)")
            if PathInfo.kind(p.from) == .regular {
                do { try PathInfo.publish(p.from, as: p.to, replace: true) } catch { throw .io("renaming \(p.from) to \(p.to): \(error)") }
            }
            try commit(next)
            finishedOperation = j.operation
        } else if let size = j.grow ?? j.resize, let next {
            say("finishing an interrupted \(j.operation)")
            try resizeImages(to: size)
            try commit(next)
            finishedOperation = j.operation
        } else if let m = j.merge, let next, PathInfo.kind(m.destination) == .regular {
            // The merge had started: images were being written. Finish it.
            if m.sources.allSatisfy({ PathInfo.kind($0) == .regular }) {
                // A reverse merge of the top (dm-ploop) whose device stopped after it dropped the
                // shadowed entries: the destination's clusters are the newer ones from then on,
                // so only what it lacks is copied down (the backend's marker says so).
                let marker = Offline.reverseMergeMarker(of: m.destination)
                let keepDestination = !m.raw && PathInfo.kind(marker) == .regular
                say("finishing an interrupted \(j.operation): merging again\(keepDestination ? " (the destination already served as the top: its clusters are kept)" : "")")
                // A device that died under an online merge left its images marked in use. No
                // device runs them now (an online recovery found none, and a live one would hold
                // their locks): the marks are stale, checked and repaired as mount does (the
                // merge repairs its destination's itself, under the lock it keeps).
                for p in m.sources { try repairStaleMark(p) }
                _ = try imageErrors { () throws(ImageError) in
                    try Offline.merge(sources: m.sources, destination: m.destination, format: m.raw ? .raw : .ploop1, keepDestination: keepDestination)
                }
            }
            try commit(next)
            finishedOperation = j.operation
        } else {
            say("rolled back an interrupted \(j.operation.split(separator: " ").first ?? "")")
        }
        endJournal(j)
    }
}
