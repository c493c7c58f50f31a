import CPloopSys
import Glibc

/// A mounted file system, reached through a descriptor of its mount point: synced (`syncfs`),
/// frozen and thawed (FIFREEZE/FITHAW), its space counted (`fstatvfs`).
public final class MountedFileSystem: Sendable {
    public let mountPoint: String
    let folder: File

    public init(_ mountPoint: String) throws(SystemError) {
        self.mountPoint = mountPoint
        folder = try File(path: mountPoint, mode: .folder)
    }

    /// `syncfs(2)`: what the file system caches reaches its device.
    public func sync() throws(SystemError) { try folder.syncFileSystem() }

    /// FIFREEZE: writes stop and the file system is made consistent on its device (it syncs).
    /// Thaw with `thaw()`; a frozen file system stays frozen if this process dies.
    public func freeze() throws(SystemError) { try shim("FIFREEZE", mountPoint) { cploop_fifreeze(folder.fd) } }

    /// FITHAW.
    public func thaw() throws(SystemError) { try shim("FITHAW", mountPoint) { cploop_fithaw(folder.fd) } }

    /// The file system's blocks and inodes, as df counts them.
    public struct Space: Codable, Sendable, Equatable {
        public var blockSize: UInt64
        public var blocks: UInt64
        public var blocksFree: UInt64
        /// Free blocks an unprivileged user may take (df's "Avail").
        public var blocksAvailable: UInt64
        public var inodes: UInt64
        public var inodesFree: UInt64
        public var bytesAvailable: UInt64 { blocksAvailable * blockSize }
    }

    public func space() throws(SystemError) -> Space {
        var s = statvfs()
        _ = try retrying("statvfs", mountPoint) { fstatvfs(folder.fd, &s) }
        return Space(
            blockSize: UInt64(s.f_frsize), blocks: UInt64(s.f_blocks), blocksFree: UInt64(s.f_bfree),
            blocksAvailable: UInt64(s.f_bavail), inodes: UInt64(s.f_files), inodesFree: UInt64(s.f_ffree))
    }

    /// `umount2(MNT_DETACH)`: the mount leaves the name space now, the file system when its last
    /// user goes (for a FUSE mount whose daemon died).
    public static func detach(_ path: String) throws(SystemError) {
        _ = try retrying("umount2", path) { RawPath.withCString(path) { umount2($0, Int32(MNT_DETACH)) } }
    }
}

/// Folders we make and remove.
public enum Folder {
    /// `mkdir(2)` of one folder (its parent must exist).
    public static func make(_ path: String, permissions: mode_t = 0o700) throws(SystemError) {
        _ = try retrying("mkdir", path) { RawPath.withCString(path) { mkdir($0, permissions) } }
    }

    /// The names in a folder (without . and ..), as the bytes the kernel gives (see `RawPath`);
    /// empty when it cannot be read.
    public static func names(_ path: String) -> [String] {
        guard let d = RawPath.withCString(path.isEmpty ? "/" : path, { opendir($0) }) else { return [] }
        defer { closedir(d) }
        var out: [String] = []
        while let entry = readdir(d) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { RawPath.decode($0.prefix { $0 != 0 }) }
            if name != "." && name != ".." { out.append(name) }
        }
        return out
    }

    /// `rmdir(2)`: removes the folder only if it is empty.
    @discardableResult
    public static func removeEmpty(_ path: String) -> Bool { RawPath.withCString(path) { rmdir($0) } == 0 }
}
