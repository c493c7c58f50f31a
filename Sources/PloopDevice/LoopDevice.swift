import Foundation
import PloopSystem

/// Loop devices: attached (direct I/O) to a file or a window of it, detached, their nodes made
/// where no udev runs. The simulator's device and the partition windows both use these.
public enum LoopDevice {
    /// Attaches a free loop device to `file` ([offset, offset + sizeLimit), 0: to its end) and
    /// returns its path.
    public static func attach(_ file: String, readOnly: Bool, offset: UInt64 = 0, sizeLimit: UInt64 = 0) throws(DeviceError) -> String {
        let backing: File
        do { backing = try File(path: file, mode: readOnly ? .readOnly : .readWrite) } catch { throw .system("open \(file)", errno: error.errno) }
        var lastError: Int32 = 0
        for _ in 0..<20 {
            let n: Int
            do { n = try LoopControl.freeIndex() } catch { throw .system("/dev/loop-control", errno: error.errno) }
            let path = "/dev/loop\(n)"
            try ensureNode(path, index: n)
            do {
                try LoopControl.configure(path, file: backing, directIO: true, readOnly: readOnly, offset: offset, sizeLimit: sizeLimit)
                return path
            } catch {
                lastError = error.errno
                // Another process took it between GET_FREE and CONFIGURE: take the next one.
                if error.code != .resourceBusy { break }
            }
        }
        throw .system("attaching a loop device to \(file)", errno: lastError)
    }

    /// The loop devices attached to `file` (as sysfs names their backing files).
    public static func backedBy(_ file: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        return names.filter { $0.hasPrefix("loop") }.sorted().compactMap { name in
            guard let backing = try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8) else { return nil }
            return backing.trimmingCharacters(in: .newlines) == file ? "/dev/\(name)" : nil
        }
    }

    public static func detach(_ path: String) throws(DeviceError) {
        // The kernel may hold the device for a moment after the last close: retry EBUSY briefly.
        for attempt in 0..<50 {
            do {
                try LoopControl.clear(path)
                return
            } catch {
                if error.code == .noSuchAddressOrDevice { return }  // not attached: nothing to do
                if error.code != .resourceBusy || attempt == 49 { throw .system("detaching \(path)", errno: error.errno) }
            }
            Host.pause(milliseconds: 20)
        }
    }

    /// /dev/loopN may be missing where no udev runs: make it from sysfs.
    public static func ensureNode(_ path: String, index: Int) throws(DeviceError) {
        if BlockNode.numbers(path) != nil { return }
        guard let text = try? String(contentsOfFile: "/sys/block/loop\(index)/dev", encoding: .utf8) else { return }
        let parts = text.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ":").compactMap { UInt32($0) }
        guard parts.count == 2 else { return }
        do { try BlockNode.make(path, major: parts[0], minor: parts[1]) } catch {
            if error.code != .fileExists { throw .system("mknod \(path)", errno: error.errno) }
        }
    }
}
