import Foundation
import Glibc

/// How much of a file the host's page cache holds (`mincore(2)` over a mapping of it).
public enum PageCache {
    /// Pages of [offset, offset+length) of the file at `path` that are resident, and how many
    /// pages that range has; nil if the file cannot be mapped.
    public static func resident(_ path: String, offset: UInt64 = 0, length: UInt64) -> (resident: Int, pages: Int)? {
        let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
        let start = offset / page * page
        let end = (offset + length + page - 1) / page * page
        guard end > start else { return (0, 0) }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        guard let map = mmap(nil, Int(end - start), PROT_READ, MAP_SHARED, fd, off_t(start)), map != MAP_FAILED else { return nil }
        defer { munmap(map, Int(end - start)) }
        let pages = Int((end - start) / page)
        var vec = [UInt8](repeating: 0, count: pages)
        guard mincore(map, Int(end - start), &vec) == 0 else { return nil }
        return (vec.filter { $0 & 1 != 0 }.count, pages)
    }

    /// Whether `path` is on tmpfs, where every byte of a file lives in the page cache (the
    /// mount of /proc/mounts with the longest prefix of its real path).
    public static func onTmpfs(_ path: String) -> Bool {
        guard let real = realpath(path, nil) else { return false }
        let resolved = String(cString: real)
        free(real)
        guard let mounts = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) else { return false }
        var best = (length: -1, type: "")
        for line in mounts.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count > 2 else { continue }
            let point = String(f[1])
            let under = resolved == point || resolved.hasPrefix(point == "/" ? "/" : point + "/")
            if under && point.count > best.length { best = (point.count, String(f[2])) }
        }
        return best.type == "tmpfs"
    }

    /// Drops the clean cached pages of a file (`POSIX_FADV_DONTNEED`), after a sync of it.
    public static func drop(_ path: String) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        defer { close(fd) }
        fdatasync(fd)
        _ = posix_fadvise(fd, 0, 0, Int32(POSIX_FADV_DONTNEED))
    }
}
