import CPloopSys
import Foundation
import PloopSystem

/// Loop devices: attached (direct I/O) to a file or a window of it, detached, their nodes made
/// where no udev runs. The simulator's device and the partition windows both use these.
public enum LoopDevice {
    /// Attaches a free loop device to `file` ([offset, offset + sizeLimit), 0: to its end) and
    /// returns its path.
    public static func attach(_ file: String, readOnly: Bool, offset: UInt64 = 0, sizeLimit: UInt64 = 0) throws(DeviceError) -> String {
        let fd = open(file, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else { throw .system("open \(file)", errno: errno) }
        defer { close(fd) }
        var lastError: Int32 = 0
        for _ in 0..<20 {
            let n = cploop_loop_get_free()
            guard n >= 0 else { throw .system("/dev/loop-control", errno: -n) }
            let path = "/dev/loop\(n)"
            try ensureNode(path, index: Int(n))
            let r = cploop_loop_configure_range(path, fd, 1, readOnly ? 1 : 0, offset, sizeLimit)
            if r == 0 { return path }
            lastError = -r
            // Another process took it between GET_FREE and CONFIGURE: take the next one.
            if r != -EBUSY { break }
        }
        throw .system("attaching a loop device to \(file)", errno: lastError)
    }

    public static func detach(_ path: String) throws(DeviceError) {
        var r: Int32 = 0
        // The kernel may hold the device for a moment after the last close: retry EBUSY briefly.
        for _ in 0..<50 {
            r = cploop_loop_clear(path)
            if r != -EBUSY { break }
            usleep(20_000)
        }
        if r != 0 && r != -ENXIO { throw .system("detaching \(path)", errno: -r) }
    }

    /// /dev/loopN may be missing where no udev runs: make it from sysfs.
    public static func ensureNode(_ path: String, index: Int) throws(DeviceError) {
        if numbers(path) != nil { return }
        guard let text = try? String(contentsOfFile: "/sys/block/loop\(index)/dev", encoding: .utf8) else { return }
        let parts = text.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ":").compactMap { UInt32($0) }
        guard parts.count == 2 else { return }
        let r = cploop_mknod_block(path, parts[0], parts[1], 0o660)
        if r != 0 && r != -EEXIST { throw .system("mknod \(path)", errno: -r) }
    }

    /// The major and minor numbers of a block device node.
    public static func numbers(_ path: String) -> (UInt32, UInt32)? {
        var major: UInt32 = 0, minor: UInt32 = 0
        return cploop_block_numbers(path, &major, &minor) == 0 ? (major, minor) : nil
    }
}
