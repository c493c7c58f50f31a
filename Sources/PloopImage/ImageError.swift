import PloopFormat
import PloopSystem

/// Errors of image files and offline operations. Each message names the file, says what is wrong
/// and, where there is one, what to do.
public enum ImageError: Error, Sendable, Equatable, Codable, CustomStringConvertible {
    case notFound(String)
    case isDirectory(String)
    case notRegularFile(String)
    case permissionDenied(String)
    case alreadyExists(String)
    case io(SystemError)
    case format(String, FormatError)
    case truncated(String, size: UInt64, needed: UInt64)
    case notPloop1(String)
    case looksLikePloop1(String)
    case clusterSizeMismatch(String, clusterBytes: Int, expected: Int)
    case inUse(String)
    case locked(String)
    case sameFile(String, String)
    case shrinkRefused(String, currentSectors: UInt64, requestedSectors: UInt64)
    case sizeNotClusterMultiple(String, bytes: UInt64, clusterBytes: Int)
    case fileTooLarge(String, block: UInt32)
    case readOnly(String)
    case corrupt(String, String)
    case noSources
    case versionConverting(String)
    case injectedCrash
    case empty(String)
    case rawNeedsFormat(String)
    case folderMissing(String, file: String)
    case notAFolder(String, file: String)
    case symlinkLoop(String)
    case nameTooLong(String)

    public var description: String {
        switch self {
        case .notFound(let p): "\(p): no such file"
        case .isDirectory(let p): "\(p) is a directory, not an image file"
        case .notRegularFile(let p): "\(p) is not a regular file"
        case .permissionDenied(let p): "\(p): permission denied (run as a user that can read and write it)"
        case .alreadyExists(let p): "\(p) already exists: remove it or choose another name"
        case .io(let e): e.description
        case .format(let p, let e): "\(p): \(e)"
        case .truncated(let p, let size, let needed):
            "\(p) is truncated: \(size) bytes, but its header and BAT need \(needed); run 'ploop check' on it"
        case .notPloop1(let p): "\(p) is not a ploop1 image (no ploop1 signature)"
        case .looksLikePloop1(let p): "\(p) carries a ploop1 header but -f raw was given: use -f ploop1"
        case .clusterSizeMismatch(let p, let c, let e):
            "\(p) has \(SizeArgument.describe(bytes: UInt64(c))) clusters, the others have \(SizeArgument.describe(bytes: UInt64(e))): deltas of one stack must share the cluster size"
        case .inUse(let p):
            "\(p) is marked in use (not closed cleanly): run 'ploop check -d \(p)' if no device uses it"
        case .locked(let p): "\(p) is in use by another ploop process or a running device"
        case .sameFile(let a, let b): "\(a) and \(b) are the same file"
        case .shrinkRefused(let p, let cur, let req):
            "\(p): cannot shrink from \(cur) to \(req) sectors; images do not shrink by grow: inflate a balloon instead ('ploop balloon change')"
        case .sizeNotClusterMultiple(let p, let b, let c):
            "\(p): size \(b) bytes is not a multiple of the cluster size \(c)"
        case .fileTooLarge(let p, let b):
            "\(p): block \(b) cannot be addressed by a v1 BAT; convert the image to v2"
        case .readOnly(let p): "\(p) is open read-only"
        case .corrupt(let p, let what): "\(p) is corrupt: \(what); run 'ploop check -f \(p)'"
        case .noSources: "no source deltas given"
        case .versionConverting(let p): "\(p) is in the middle of a v1/v2 conversion"
        case .injectedCrash: "injected crash (test)"
        case .empty(let p): "\(p) is empty (0 bytes): not an image"
        case .rawNeedsFormat(let p): "\(p) has no ploop1 signature: if it is a raw image, say so with -f raw"
        case .folderMissing(let d, let f): "cannot create \(f): the folder \(d) does not exist (create it first)"
        case .notAFolder(let d, let f): "cannot use \(f): \(d) is not a folder"
        case .symlinkLoop(let p): "\(p): too many levels of symbolic links (a symlink loop?)"
        case .nameTooLong(let p): "\(p): the path or one of its names is too long"
        }
    }

    static func from(_ e: SystemError) -> ImageError {
        if e.reason != nil { return .io(e) }
        switch e.code {
        case .noSuchFileOrDirectory: return .notFound(e.path)
        case .permissionDenied, .notPermitted: return .permissionDenied(e.path)
        case .fileExists: return .alreadyExists(e.path)
        case .isDirectory: return .isDirectory(e.path)
        case .tooManySymbolicLinkLevels: return .symlinkLoop(e.path)
        case .fileNameTooLong: return .nameTooLong(e.path)
        case .notDirectory: return .notAFolder(Self.parent(of: e.path), file: e.path)
        default: return .io(e)
        }
    }

    static func from(_ e: PathInfo.PublishError, _ path: String) -> ImageError {
        switch e {
        case .exists, .notRegular: .alreadyExists(path)
        case .system(let s): .from(s)
        }
    }

    static func parent(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}
