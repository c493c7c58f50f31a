import CPloopSys
import Glibc

/// A file built beside its destination and published (renamed into place) only when complete:
/// `DEST.SUFFIX-PID`, created exclusively (never through a symlink) and held with an exclusive
/// `flock` while this process builds it. Interrupted by SIGINT, SIGTERM or SIGHUP, the process
/// removes it; killed outright, it leaves it, and the next builder of the same destination
/// removes it: a temporary file whose lock can be taken has no live builder (a lock dies with
/// its process, whatever became of the PID since).
public final class TemporaryFile {
    public let destination: String
    public let path: String
    public let file: File
    public private(set) var published = false
    /// Stale temporary files of this destination removed when this one was made.
    public let removedStale: [String]

    public init(destination: String, suffix: String, replace: Bool) throws(PathInfo.PublishError) {
        try PathInfo.checkDestination(destination, replace: replace)
        self.destination = destination
        removedStale = Self.removeStale(of: destination, suffix: suffix)
        path = destination + ".\(suffix)-\(getpid())"
        do { file = try File(path: path, mode: .createNew) } catch { throw .system(error) }
        _ = try? file.tryLock(.exclusive)
        RawPath.withCString(path) { cploop_unlink_on_signal($0) }
    }

    deinit {
        cploop_unlink_on_signal(nil)
        if !published { PathInfo.removeRegularFile(path) }
    }

    /// Syncs the file and renames it to the destination (see `PathInfo.publish`).
    public func publish(replace: Bool) throws(PathInfo.PublishError) {
        do { try file.sync() } catch { throw .system(error) }
        try PathInfo.publish(path, as: destination, replace: replace)
        published = true
        cploop_unlink_on_signal(nil)
    }

    /// Removes `DEST.SUFFIX-PID` files whose builder is gone (their lock can be taken).
    @discardableResult
    public static func removeStale(of destination: String, suffix: String) -> [String] {
        let slash = destination.lastIndex(of: "/")
        let dir = slash.map { String(destination[..<$0]) } ?? "."
        let prefix = (slash.map { String(destination[destination.index(after: $0)...]) } ?? destination) + ".\(suffix)-"
        var removed: [String] = []
        for name in Folder.names(dir) {
            guard name.hasPrefix(prefix) else { continue }
            let pid = name.dropFirst(prefix.count)
            guard !pid.isEmpty, pid.allSatisfy({ $0.isASCII && $0.isNumber }) else { continue }
            let p = (dir.isEmpty ? "" : dir) + "/" + name
            guard PathInfo.entryKind(p) == .regular, let f = try? File(path: p, mode: .readOnly) else { continue }
            if (try? f.tryLock(.exclusive)) == true, PathInfo.removeRegularFile(p) { removed.append(p) }
        }
        return removed
    }
}
