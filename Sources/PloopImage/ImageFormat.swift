import PloopFormat
import PloopSystem
#if canImport(Glibc)
import Glibc
#endif

/// The two delta formats.
public enum ImageFormat: String, Sendable, CaseIterable, Codable {
    case raw
    case ploop1
}

/// Opening image paths: clear errors for missing, directory, special and unreadable files.
public enum ImagePath {
    /// Opens an existing regular file.
    public static func open(_ path: String, write: Bool) throws(ImageError) -> PosixBlockFile {
        switch PathInfo.kind(path) {
        case .missing:
            // Say why: a loop, a name too long and a file where a folder should be are not "no such file".
            if let e = PathInfo.statError(path) { throw ImageError.from(SystemError("stat", path: path, errno: e)) }
            throw .notFound(path)
        case .directory: throw .isDirectory(path)
        case .other, .blockDevice: throw .notRegularFile(path)
        case .regular: break
        }
        return try PosixBlockFile(path: path, mode: write ? .readWrite : .readOnly)
    }

    /// A path a new image may be created at: nothing there (not even a dangling symlink), in a
    /// folder that exists.
    public static func checkNew(_ path: String) throws(ImageError) {
        let dir = ImageError.parent(of: path)
        switch PathInfo.kind(dir) {
        case .directory: break
        case .missing:
            if let e = PathInfo.statError(dir), e != ENOENT { throw ImageError.from(SystemError("stat", path: dir, errno: e)) }
            throw .folderMissing(dir, file: path)
        default: throw .notAFolder(dir, file: path)
        }
        if PathInfo.entryKind(path) != .missing { throw .alreadyExists(path) }
        if RawPath.bytes(path).count >= Int(PATH_MAX) { throw .nameTooLong(path) }
        // Room for the temporary name (".init-PID") beside it.
        if let name = path.split(separator: "/").last, RawPath.bytes(String(name)).count + 16 > Int(NAME_MAX) { throw .nameTooLong(path) }
    }

    /// Takes a non-blocking lock, or explains who holds it.
    public static func lock(_ file: PosixBlockFile, exclusive: Bool) throws(ImageError) {
        let ok: Bool
        do { ok = try file.file.tryLock(exclusive ? .exclusive : .shared) } catch { throw .io(error) }
        if !ok { throw .locked(file.path) }
    }

    /// The suffix of an image `createImage` is building (`PATH.new-PID`).
    public static let newImageSuffix = "new"

    /// A new, empty image at `path`, published whole: built as `PATH.new-PID` (header and empty
    /// BAT, synced), renamed into place (never over anything) with its folder synced, then opened
    /// by its name (and locked exclusively with `lock`). A kill before the rename leaves only the
    /// temporary file, which the next creation of the same name removes: nothing is ever left
    /// under `path` that is not a whole image (a 0-byte delta used to be, and `check` calls that
    /// fatal).
    public static func createImage(_ path: String, header: ImageHeader, lock: Bool) throws(ImageError) -> PosixBlockFile {
        if PathInfo.kind(path) != .missing { throw .alreadyExists(path) }
        do {
            let building = try TemporaryFile(destination: path, suffix: newImageSuffix, replace: false)
            try Ploop1Image.create(on: PosixBlockFile(building.file), header: header)
            try building.publish(replace: false)
        } catch let e as PathInfo.PublishError {
            throw .from(e, path)
        } catch let e as ImageError {
            throw e
        } catch {
            throw .io(SystemError("create", path: path, errno: EIO, reason: "\(error)"))
        }
        // The builder's descriptor (and its lock) closed with the scope above.
        let f = try PosixBlockFile(path: path, mode: .readWrite)
        if lock { try Self.lock(f, exclusive: true) }
        return f
    }

    /// Reads the first bytes and tells whether the file carries a ploop1 signature.
    public static func detectFormat(_ file: any BlockFile) throws(ImageError) -> ImageFormat {
        ImageHeader.hasSignature(try file.readBytes(16, at: 0)) ? .ploop1 : .raw
    }
}

/// Which header version `init` picks when not told: v2, unless the loaded ploop kernel module lacks
/// large-disk support (then v1, as the original does).
public enum DefaultVersion {
    public static func detect(sysModule: String = "/sys/module/ploop") -> FormatVersion {
        if PathInfo.kind(sysModule) == .directory,
            PathInfo.kind(sysModule + "/parameters/large_disk_support") == .missing
        {
            return .v1
        }
        return .v2
    }
}
