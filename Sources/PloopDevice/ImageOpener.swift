import PloopFormat
import PloopImage
import PloopSystem
import Synchronization

/// How a device opens, creates and removes its image files: real files, or memory in tests (where
/// crash points are injected).
public protocol ImageOpener: Sendable {
    /// Opens a file; with `lock`, an opener that locks (`PosixOpener(locking: true)`, the
    /// daemon's) holds it (exclusively when `writable`, shared when not) for as long as the
    /// returned file lives. Openers that do not lock (in-process tests, memory) ignore `lock`.
    func open(_ path: String, writable: Bool, lock: Bool) throws(ImageError) -> any BlockFile
    /// Creates a new, empty delta holding `header`; nothing appears at `path` until it is whole
    /// (on disk: see `ImagePath.createImage`). Fails if something is there.
    func createImage(_ path: String, header: ImageHeader) throws(ImageError) -> any BlockFile
    func remove(_ path: String)
    /// Changes the lock `open` took on `file` (a level that becomes the top or a merge destination
    /// takes it exclusively; one that becomes read-only shares it). Fails, keeping the old lock's
    /// kind where it can, when another holder keeps the file.
    func relock(_ file: any BlockFile, exclusive: Bool) throws(ImageError)
}

extension ImageOpener {
    public func relock(_ file: any BlockFile, exclusive: Bool) throws(ImageError) {}
}

/// Files on disk. With `locking`, every file is `flock`ed while open: the writable top (and a
/// merge destination) exclusively, read-only levels shared, so no other process can write an
/// image of a running stack (a second mount, an offline merge), while read-only levels can be
/// shared with another read-only stack (a temporary snapshot's device). With `direct`, each file
/// also gets an `O_DIRECT` twin for its aligned data I/O (`DirectIO`); where the host file system
/// refuses it, `note` is told and the file goes through the page cache.
public struct PosixOpener: ImageOpener {
    public let locking: Bool
    public let direct: Bool
    let note: @Sendable (String) -> Void

    /// `locking`: whether `open(lock: true)` takes a flock. Said at each use, not defaulted.
    public init(locking: Bool, direct: Bool = false, note: @escaping @Sendable (String) -> Void = { _ in }) {
        self.locking = locking
        self.direct = direct
        self.note = note
    }

    public func open(_ path: String, writable: Bool, lock: Bool) throws(ImageError) -> any BlockFile {
        let f = try ImagePath.open(path, write: writable)
        if locking && lock { try ImagePath.lock(f, exclusive: writable) }
        return twin(f, writable: writable)
    }

    public func relock(_ file: any BlockFile, exclusive: Bool) throws(ImageError) {
        guard locking, let f = file as? PosixBlockFile else { return }
        try ImagePath.lock(f, exclusive: exclusive)
    }

    public func createImage(_ path: String, header: ImageHeader) throws(ImageError) -> any BlockFile {
        twin(try ImagePath.createImage(path, header: header, lock: locking), writable: true)
    }

    public func remove(_ path: String) { PathInfo.remove(path) }

    private func twin(_ f: PosixBlockFile, writable: Bool) -> PosixBlockFile {
        guard direct else { return f }
        let (file, why) = DirectIO.twin(of: f, writable: writable)
        if let why { note(why) }
        return file
    }
}

/// Files in memory, by name. Every open of a name returns the same bytes.
public final class MemoryOpener: ImageOpener {
    private let files = Mutex<[String: MemoryBlockFile]>([:])
    /// Wraps every file handed out (e.g. in a `CrashingBlockFile`).
    private let wrap: @Sendable (any BlockFile) -> any BlockFile

    public init(wrap: @escaping @Sendable (any BlockFile) -> any BlockFile = { $0 }) {
        self.wrap = wrap
    }

    public func add(_ path: String, _ file: MemoryBlockFile) { files.withLock { $0[path] = file } }
    public func file(_ path: String) -> MemoryBlockFile? { files.withLock { $0[path] } }
    public var paths: [String] { files.withLock { Array($0.keys) } }

    public func open(_ path: String, writable: Bool, lock: Bool) throws(ImageError) -> any BlockFile {
        guard let f = file(path) else { throw .notFound(path) }
        return wrap(f)
    }

    /// The name is taken at once (a second create fails) and given up again if writing the
    /// header fails (an injected fault), so nothing half-made stays under it, as on disk.
    public func createImage(_ path: String, header: ImageHeader) throws(ImageError) -> any BlockFile {
        let made: MemoryBlockFile? = files.withLock { d in
            if d[path] != nil { return nil }
            let f = MemoryBlockFile(path: path)
            d[path] = f
            return f
        }
        guard let made else { throw .alreadyExists(path) }
        let f = wrap(made)
        do { try Ploop1Image.create(on: f, header: header) } catch {
            remove(path)
            throw error
        }
        return f
    }

    public func remove(_ path: String) { _ = files.withLock { $0.removeValue(forKey: path) } }
}
