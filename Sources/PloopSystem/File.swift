import CPloopSys
import Glibc
import Synchronization
import SystemPackage

/// An open file descriptor (swift-system's `FileDescriptor`), closed once when the object goes
/// away. All positional I/O is full: short reads stop only at end of file, short writes are
/// continued. EINTR is retried by swift-system, or by `retrying`/`shim` for the calls it lacks.
public final class File: Sendable {
    public let descriptor: FileDescriptor
    public let path: String
    public let writable: Bool
    /// Whether the descriptor is ours to close (false for one `borrowing` made).
    let owning: Bool
    /// Whether `tryLock` took a lock that `unlock` has not let go.
    private let locked = Atomic<Bool>(false)
    /// The raw descriptor, for the C shims and libfuse.
    public var fd: Int32 { descriptor.rawValue }

    public struct OpenMode: Sendable, Equatable {
        public var write: Bool
        public var create: Bool
        public var exclusive: Bool
        public var direct: Bool = false
        /// `O_DIRECTORY`: the path must be a folder (for fsync of it, syncfs, FIFREEZE).
        public var directory: Bool = false
        public init(write: Bool, create: Bool, exclusive: Bool, direct: Bool = false, directory: Bool = false) {
            self.write = write
            self.create = create
            self.exclusive = exclusive
            self.direct = direct
            self.directory = directory
        }
        /// Create if missing, keep if present.
        public static let createOrOpen = OpenMode(write: true, create: true, exclusive: false)
        public static let readOnly = OpenMode(write: false, create: false, exclusive: false)
        public static let readWrite = OpenMode(write: true, create: false, exclusive: false)
        /// Create a new file; fail if it exists (`O_CREAT|O_EXCL`).
        public static let createNew = OpenMode(write: true, create: true, exclusive: true)
        /// A folder, read-only.
        public static let folder = OpenMode(write: false, create: false, exclusive: false, directory: true)
        /// `O_EXCL` without `O_CREAT` on a block device: fails with EBUSY while a holder (a mounted
        /// file system, another exclusive opener) has it.
        public static let exclusiveDevice = OpenMode(write: false, create: false, exclusive: true)
    }

    /// `open(2)`. A mode that may create the file opens only a regular file that is really at
    /// `path`: a symlink there is not followed (`O_NOFOLLOW`), and a FIFO, device node or
    /// directory is refused before it is opened, so nothing that is not ours is written or cut.
    public init(path: String, mode: OpenMode, permissions: mode_t = 0o600) throws(SystemError) {
        var options: FileDescriptor.OpenOptions = [.closeOnExec]
        if mode.create {
            options.formUnion([.create, .noFollow])
            switch PathInfo.entryKind(path) {
            case .missing, .regular: break
            case let other: throw SystemError("open", path: path, .fileExists, reason: "exists and is \(other), not a regular file: refusing to write it")
            }
        }
        if mode.exclusive { options.insert(.exclusiveCreate) }
        let creates = mode.create && ChangeRecorder.active && PathInfo.entryKind(path) == .missing
        if mode.direct { options.insert(FileDescriptor.OpenOptions(rawValue: cploop_o_direct())) }
        if mode.directory { options.insert(.directory) }
        let access: FileDescriptor.AccessMode = mode.write ? .readWrite : .readOnly
        self.descriptor = try lifting("open", path) {
            try FileDescriptor.open(RawPath.filePath(path), access, options: options, permissions: FilePermissions(rawValue: permissions))
        }
        self.path = path
        self.writable = mode.write
        self.owning = true
        if creates { ChangeRecorder.record(.create, path) }
        if mode.create {
            var st = Glibc.stat()
            if fstat(descriptor.rawValue, &st) == 0, st.st_mode & S_IFMT != S_IFREG {
                throw SystemError("open", path: path, .fileExists, reason: "is not a regular file: refusing to write it")
            }
        }
    }

    /// A file over a descriptor someone else opened and will close (one passed to us in an
    /// ioctl argument, say): read and stat it, never close it.
    public init(borrowing fd: Int32, path: String) {
        descriptor = FileDescriptor(rawValue: fd)
        self.path = path
        writable = false
        owning = false
    }

    /// A lock taken is let go explicitly before the close: a child being spawned by another
    /// thread holds a copy of every descriptor until its exec, and a lock lives as long as any
    /// copy of the open file does. Closing alone left the lock with that child for a moment, and
    /// the next open of the same file by this process found it "in use".
    deinit {
        guard owning else { return }
        if locked.load(ordering: .relaxed) { _ = flock(fd, LOCK_UN) }
        try? descriptor.close()
    }

    /// `fstat(2)`.
    public func stat() throws(SystemError) -> Glibc.stat {
        var st = Glibc.stat()
        _ = try retrying("fstat", path) { fstat(fd, &st) }
        return st
    }

    public func size() throws(SystemError) -> UInt64 { UInt64(try stat().st_size) }

    /// The offset of the end (`lseek(SEEK_END)`): a block device's size, which `fstat` does not give.
    public func endOffset() throws(SystemError) -> UInt64 {
        UInt64(try lifting("lseek", path) { try descriptor.seek(offset: 0, from: .end) })
    }

    /// `pread(2)` until the buffer is full or end of file; returns the bytes read.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int {
        var done = 0
        while done < buffer.count {
            let at = try position("read", offset, done)
            let rest = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            let n = try lifting("read", path) { try descriptor.read(fromAbsoluteOffset: at, into: rest) }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// One `pread(2)`: fewer bytes than asked at end of file (and, rarely, elsewhere).
    public func readOnce(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int {
        let at = try position("read", offset, 0)
        return try lifting("read", path) { try descriptor.read(fromAbsoluteOffset: at, into: buffer) }
    }

    /// `pwrite(2)` of the whole buffer.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(SystemError) {
        try CrashPoint.step("write", path)
        var done = 0
        while done < buffer.count {
            let at = try position("write", offset, done)
            let rest = UnsafeRawBufferPointer(rebasing: buffer[done...])
            let n = try lifting("write", path) { try descriptor.write(toAbsoluteOffset: at, rest) }
            done += n
        }
        ChangeRecorder.record(.write, path, offset, data: buffer)
    }

    /// `offset + done` as an `off_t`, or EFBIG: offsets come from on-disk values and arguments,
    /// and a value past `Int64.max` must fail the call, never trap the process.
    private func position(_ call: String, _ offset: UInt64, _ done: Int) throws(SystemError) -> Int64 {
        let (sum, overflow) = offset.addingReportingOverflow(UInt64(done))
        guard !overflow, let at = Int64(exactly: sum) else { throw SystemError(call, path: path, errno: EFBIG) }
        return at
    }

    /// `fsync(2)`.
    public func sync() throws(SystemError) {
        try CrashPoint.step("fsync", path)
        _ = try retrying("fsync", path) { fsync(fd) }
        ChangeRecorder.record(.sync, path)
    }

    /// `fdatasync(2)`.
    public func dataSync() throws(SystemError) {
        try CrashPoint.step("fdatasync", path)
        _ = try retrying("fdatasync", path) { fdatasync(fd) }
        ChangeRecorder.record(.sync, path)
    }

    /// `fallocate(2)` mode 0 over [0, length): strict (no fallback); false only for EOPNOTSUPP.
    public func allocateStrict(length: UInt64) throws(SystemError) {
        let len = try position("fallocate", length, 0)
        try shim("fallocate", path) { cploop_fallocate(fd, 0, 0, len) }
        ChangeRecorder.record(.allocate, path, 0, length)
    }

    /// `syncfs(2)`: the whole file system holding this file.
    public func syncFileSystem() throws(SystemError) { try shim("syncfs", path) { cploop_syncfs(fd) } }

    /// `ftruncate(2)`.
    public func truncate(to length: UInt64) throws(SystemError) {
        try CrashPoint.step("ftruncate", path)
        let to = try position("ftruncate", length, 0)
        try lifting("ftruncate", path) { try descriptor.resize(to: to) }
        ChangeRecorder.record(.truncate, path, length)
    }

    public enum LockKind: Sendable { case shared, exclusive }

    /// `flock(2)` without waiting. Returns false if another open file holds a conflicting lock.
    public func tryLock(_ kind: LockKind) throws(SystemError) -> Bool {
        let op = (kind == .shared ? LOCK_SH : LOCK_EX) | LOCK_NB
        do { _ = try retrying("flock", path) { flock(fd, op) } } catch {
            if error.errno == EWOULDBLOCK { return false }
            throw error
        }
        locked.store(true, ordering: .relaxed)
        return true
    }

    public func unlock() {
        _ = flock(fd, LOCK_UN)
        locked.store(false, ordering: .relaxed)
    }

    /// `fallocate(2)` with `FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE`.
    public func punchHole(at offset: UInt64, length: UInt64) throws(SystemError) {
        try CrashPoint.step("fallocate", path)
        let (at, len) = (try position("fallocate", offset, 0), try position("fallocate", length, 0))
        try shim("fallocate", path) { cploop_fallocate(fd, FallocateMode([.punchHole, .keepSize]).rawValue, at, len) }
        ChangeRecorder.record(.zero, path, offset, length)
    }

    /// `fallocate(2)` mode 0: real space that reads as zeros. Returns false where the file system
    /// cannot (EOPNOTSUPP), so the caller can write zeros instead.
    public func allocate(at offset: UInt64, length: UInt64) throws(SystemError) -> Bool {
        try CrashPoint.step("fallocate", path)
        let (at, len) = (try position("fallocate", offset, 0), try position("fallocate", length, 0))
        let done = try unlessUnsupported { () throws(SystemError) in try shim("fallocate", path) { cploop_fallocate(fd, 0, at, len) } }
        if done { ChangeRecorder.record(.allocate, path, offset, length) }
        return done
    }

    /// `fallocate(2)` with `FALLOC_FL_ZERO_RANGE|FALLOC_FL_KEEP_SIZE`.
    public func zeroRange(at offset: UInt64, length: UInt64) throws(SystemError) -> Bool {
        try CrashPoint.step("fallocate", path)
        let (at, len) = (try position("fallocate", offset, 0), try position("fallocate", length, 0))
        let done = try unlessUnsupported { () throws(SystemError) in
            try shim("fallocate", path) { cploop_fallocate(fd, FallocateMode([.zeroRange, .keepSize]).rawValue, at, len) }
        }
        if done { ChangeRecorder.record(.zero, path, offset, length) }
        return done
    }

    /// Runs a call; false instead of an error where the file system does not support it
    /// (EOPNOTSUPP, ENOSYS), so the caller can do the work another way.
    private func unlessUnsupported(_ body: () throws(SystemError) -> Void) throws(SystemError) -> Bool {
        do { try body() } catch {
            if error.errno == EOPNOTSUPP || error.errno == ENOSYS { return false }
            throw error
        }
        return true
    }

    /// The file's extents from FIEMAP: (logical offset, length, unwritten) in byte order.
    public func extents() throws(SystemError) -> [(offset: UInt64, length: UInt64, unwritten: Bool)] {
        try physicalExtents().map { ($0.logical, $0.length, $0.unwritten) }
    }

    public struct Extent: Sendable, Equatable {
        public var logical: UInt64
        public var physical: UInt64
        public var length: UInt64
        public var unwritten: Bool
    }

    /// FIEMAP with physical offsets (bytes on the device holding the file system).
    public func physicalExtents() throws(SystemError) -> [Extent] {
        var out: [Extent] = []
        var start: UInt64 = 0
        let batch = 256
        var buf = [cploop_extent](repeating: cploop_extent(), count: batch)
        while true {
            var last: Int32 = 0
            let n = cploop_fiemap(fd, start, UInt64.max - start, &buf, UInt32(batch), &last)
            if n < 0 { throw SystemError("FIEMAP", path: path, errno: -n) }
            for i in 0..<Int(n) {
                out.append(Extent(logical: buf[i].logical, physical: buf[i].physical, length: buf[i].length, unwritten: ExtentFlags(rawValue: buf[i].flags).contains(.unwritten)))
            }
            if n == 0 || last != 0 { break }
            start = buf[Int(n) - 1].logical + buf[Int(n) - 1].length
        }
        return out
    }

    /// `copy_file_range(2)` of exactly `length` bytes (the kernel may copy without a user buffer).
    /// Falls back to read/write when the file systems refuse.
    public func copy(from source: File, at sourceOffset: UInt64, to offset: UInt64, length: Int, scratch: UnsafeMutableRawBufferPointer) throws(SystemError) {
        try CrashPoint.step("copy_file_range", path)
        var inOff = try position("copy_file_range", sourceOffset, 0)
        var outOff = try position("copy_file_range", offset, 0)
        _ = try position("copy_file_range", offset, length)  // the end must be an off_t too
        var left = length
        while left > 0 {
            let n = cploop_copy_file_range(source.fd, &inOff, fd, &outOff, UInt64(left))
            if n > 0 { left -= Int(n); continue }
            if n == 0 { break }  // source ended: the rest is zeros
            let e = Int32(-n)
            if e == EINTR { continue }
            if e == EXDEV || e == EINVAL || e == ENOSYS || e == EOPNOTSUPP { break }
            throw SystemError("copy_file_range", path: path, errno: e)
        }
        while left > 0 {
            let chunk = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<min(left, scratch.count)])
            let got = try source.read(into: chunk, at: UInt64(inOff))
            if got < chunk.count { chunk[got...].initializeMemory(as: UInt8.self, repeating: 0) }
            try write(UnsafeRawBufferPointer(chunk), at: UInt64(outOff))
            inOff += Int64(chunk.count)
            outOff += Int64(chunk.count)
            left -= chunk.count
        }
        if ChangeRecorder.active {
            // What the kernel copied, as the write it amounts to.
            let copied = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 16)
            defer { copied.deallocate() }
            let n = try read(into: copied, at: offset)
            ChangeRecorder.record(.write, path, offset, data: UnsafeRawBufferPointer(rebasing: copied[0..<n]))
        }
    }

    /// The ranges of [start, end) that have space on disk (written or preallocated), from FIEMAP;
    /// where the file system has no FIEMAP, the data ranges from SEEK_DATA/SEEK_HOLE.
    public func allocatedRanges(from start: UInt64, to end: UInt64) throws(SystemError) -> [Range<UInt64>] {
        guard let all = try? extents() else { return try dataRanges(from: start, to: end) }
        var ranges: [Range<UInt64>] = []
        for e in all {
            let lo = max(e.offset, start)
            let hi = min(e.offset + e.length, end)
            guard lo < hi else { continue }
            if let last = ranges.last, last.upperBound == lo {
                ranges[ranges.count - 1] = last.lowerBound..<hi
            } else {
                ranges.append(lo..<hi)
            }
        }
        return ranges
    }

    /// The data ranges of the file in [start, end), found with `lseek(SEEK_DATA/SEEK_HOLE)`.
    public func dataRanges(from start: UInt64, to end: UInt64) throws(SystemError) -> [Range<UInt64>] {
        var ranges: [Range<UInt64>] = []
        var pos = try position("lseek", start, 0)
        while UInt64(pos) < end {
            let data = cploop_seek_data_hole(fd, pos, 0)
            if data < 0 {
                if data == -Int64(ENXIO) { break }
                throw SystemError("lseek", path: path, errno: Int32(-data))
            }
            if UInt64(data) >= end { break }
            let hole = cploop_seek_data_hole(fd, data, 1)
            if hole < 0 { throw SystemError("lseek", path: path, errno: Int32(-hole)) }
            ranges.append(UInt64(data)..<min(UInt64(hole), end))
            pos = hole
        }
        return ranges
    }
}

/// Facts about a path without opening it.
public enum PathInfo {
    public enum Kind: Sendable, Equatable { case missing, regular, directory, blockDevice, other }

    public static func kind(_ path: String) -> Kind {
        var st = Glibc.stat()
        guard RawPath.withCString(path, { cploop_stat($0, &st) }) == 0 else { return .missing }
        switch st.st_mode & S_IFMT {
        case S_IFREG: return .regular
        case S_IFDIR: return .directory
        case S_IFBLK: return .blockDevice
        default: return .other
        }
    }

    /// The errno `stat(2)` fails with on `path`, or nil if it succeeds.
    public static func statError(_ path: String) -> Int32? {
        var st = Glibc.stat()
        let r = RawPath.withCString(path) { cploop_stat($0, &st) }
        return r == 0 ? nil : -r
    }

    /// What is at a path itself, a final symlink not followed (`lstat(2)`).
    public enum EntryKind: Sendable, Equatable, CustomStringConvertible {
        case missing, regular, symbolicLink, directory, fifo, device, socket, unknown
        public var description: String {
            switch self {
            case .missing: "missing"
            case .regular: "a regular file"
            case .symbolicLink: "a symbolic link"
            case .directory: "a directory"
            case .fifo: "a FIFO"
            case .device: "a device node"
            case .socket: "a socket"
            case .unknown: "of an unknown kind"
            }
        }
    }

    public static func entryKind(_ path: String) -> EntryKind {
        var st = Glibc.stat()
        guard RawPath.withCString(path, { cploop_lstat($0, &st) }) == 0 else { return .missing }
        switch st.st_mode & S_IFMT {
        case S_IFREG: return .regular
        case S_IFLNK: return .symbolicLink
        case S_IFDIR: return .directory
        case S_IFIFO: return .fifo
        case S_IFBLK, S_IFCHR: return .device
        case S_IFSOCK: return .socket
        default: return .unknown
        }
    }

    /// Why `publish` refused.
    public enum PublishError: Error, Sendable, Equatable, CustomStringConvertible {
        case exists(String)
        case notRegular(String, EntryKind)
        case system(SystemError)
        public var description: String {
            switch self {
            case .exists(let p): "\(p) already exists: remove it, or give --replace"
            case .notRegular(let p, let k): "\(p) is \(k), not a regular file: it is never replaced; choose another destination"
            case .system(let e): e.description
            }
        }
    }

    /// Checks that `destination` may receive a file we build: missing, or (with `replace`) a
    /// regular file. Callers check before they start and `publish` checks again at the end.
    public static func checkDestination(_ destination: String, replace: Bool) throws(PublishError) {
        switch entryKind(destination) {
        case .missing: return
        case .regular: if !replace { throw .exists(destination) }
        case let other: throw .notRegular(destination, other)
        }
    }

    /// Renames `temp` (a regular file this process made) to `destination` and syncs the folder.
    /// Only a regular file is ever replaced, and only with `replace`; without it, something that
    /// appeared at `destination` meanwhile is not replaced either (`RENAME_NOREPLACE`).
    public static func publish(_ temp: String, as destination: String, replace: Bool) throws(PublishError) {
        try checkDestination(destination, replace: replace)
        do { try CrashPoint.step("rename", destination) } catch { throw .system(error) }
        let r: Int32
        if replace && entryKind(destination) == .regular {
            r = RawPath.withCString(temp) { t in RawPath.withCString(destination) { d in rename(t, d) == 0 ? 0 : -errno } }
        } else {
            r = RawPath.withCString(temp) { t in RawPath.withCString(destination) { d in cploop_rename_noreplace(t, d) } }
        }
        if r == -EEXIST { throw .exists(destination) }
        if r != 0 { throw .system(SystemError("rename", path: destination, errno: -r)) }
        Array(destination.utf8).withUnsafeBytes { ChangeRecorder.record(.rename, temp, data: $0) }
        syncParentDirectory(of: destination)
    }

    /// Writes `bytes` as the whole of `path`, atomically: into `path.tmp` (a leftover one is
    /// dropped first), synced, published as `publish` does (over a regular file only, and only with
    /// `replace`), the folder synced. On failure the temporary file is removed and `path` is as it was.
    public static func writeAtomically(_ bytes: [UInt8], to path: String, replace: Bool, permissions: mode_t = 0o600) throws(PublishError) {
        let tmp = path + ".tmp"
        removeRegularFile(tmp)
        do throws(SystemError) {
            let f = try File(path: tmp, mode: .createNew, permissions: permissions)
            var failure: SystemError?
            bytes.withUnsafeBytes { b in
                do throws(SystemError) { try f.write(b, at: 0) } catch { failure = error }
            }
            if let failure { throw failure }
            try f.sync()
        } catch {
            removeRegularFile(tmp)
            throw .system(error)
        }
        do { try publish(tmp, as: path, replace: replace) } catch {
            removeRegularFile(tmp)
            throw error
        }
    }

    /// Removes `path` only if it is a regular file (never a link, node or folder someone put there).
    @discardableResult
    public static func removeRegularFile(_ path: String) -> Bool {
        guard entryKind(path) == .regular else { return false }
        do { try CrashPoint.step("unlink", path) } catch { return false }
        guard RawPath.withCString(path, { unlink($0) }) == 0 else { return false }
        ChangeRecorder.record(.unlink, path)
        return true
    }

    /// (device, inode) of a path, to tell whether two names are one file.
    public static func identity(_ path: String) -> FileIdentity? {
        var st = Glibc.stat()
        guard RawPath.withCString(path, { cploop_stat($0, &st) }) == 0 else { return nil }
        return FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    /// fsyncs the directory holding `path`, so a create or rename in it is durable.
    public static func syncParentDirectory(of path: String) {
        let dir = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        // Not a crash point of its own: a kill here is a kill just after the rename.
        guard let folder = try? File(path: dir.isEmpty ? "/" : dir, mode: .folder) else { return }
        if (try? retrying("fsync", dir) { fsync(folder.fd) }) != nil { ChangeRecorder.record(.sync, dir.isEmpty ? "/" : dir) }
    }

    public static func remove(_ path: String) {
        if RawPath.withCString(path, { unlink($0) }) == 0 { ChangeRecorder.record(.unlink, path) }
    }
}

public struct FileIdentity: Hashable, Sendable {
    public let device: UInt64
    public let inode: UInt64
}

extension File {
    public var identity: FileIdentity? {
        guard let st = try? stat() else { return nil }
        return FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }
}

/// FIEMAP's extent flags (linux/fiemap.h) that we read.
public struct ExtentFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// FIEMAP_EXTENT_UNWRITTEN: allocated, reads as zeros (fallocate without data).
    public static let unwritten = ExtentFlags(rawValue: 0x800)
}

/// `fallocate(2)`'s mode bits (linux/falloc.h), instead of bare numbers.
public struct FallocateMode: OptionSet, Sendable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// FALLOC_FL_KEEP_SIZE: the file's length does not change.
    public static let keepSize = FallocateMode(rawValue: 0x01)
    /// FALLOC_FL_PUNCH_HOLE: the range is deallocated and reads zeros (with keepSize).
    public static let punchHole = FallocateMode(rawValue: 0x02)
    /// FALLOC_FL_ZERO_RANGE: the range reads zeros, space kept.
    public static let zeroRange = FallocateMode(rawValue: 0x10)
}
