import Foundation
import PloopDevice

/// File systems mounted now, from /proc/mounts.
public enum Mounts {
    public struct Entry: Equatable, Sendable {
        public var source: String
        public var target: String
        public var type: String
        public var options: [String]
    }

    public static func all() -> [Entry] {
        guard let text = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ")
            guard f.count >= 4 else { return nil }
            return Entry(source: unescape(String(f[0])), target: unescape(String(f[1])), type: String(f[2]), options: f[3].split(separator: ",").map(String.init))
        }
    }

    static func unescape(_ s: String) -> String {
        s.replacingOccurrences(of: "\\040", with: " ").replacingOccurrences(of: "\\011", with: "\t").replacingOccurrences(of: "\\134", with: "\\")
    }

    static func standardized(_ p: String) -> String { URL(fileURLWithPath: p).standardizedFileURL.resolvingSymlinksInPath().path }

    /// The mount at `mountPoint` (the last one stacked there).
    public static func entry(at mountPoint: String) -> Entry? {
        let target = standardized(mountPoint)
        return all().last { $0.target == target }
    }

    /// The device whose file system is mounted at `mountPoint`.
    public static func device(at mountPoint: String) -> String? { entry(at: mountPoint)?.source }

    public static func entries(of source: String) -> [Entry] { all().filter { $0.source == source } }

    /// Mount points of `device` and of its partitions (`/dev/ploopNpM`), in mount order.
    public static func mountPoints(ofDeviceOrPartitions device: String) -> [String] {
        all().filter { e in
            guard e.source.hasPrefix(device) else { return false }
            let rest = e.source.dropFirst(device.count)
            let number = rest.dropFirst()
            return rest.isEmpty || (rest.first == "p" && !number.isEmpty && number.allSatisfy { $0.isASCII && $0.isNumber })
        }.map(\.target)
    }

    /// Whether something is mounted on `directory` itself.
    public static func isMountPoint(_ directory: String) -> Bool { entry(at: directory) != nil }
}

/// A ploop device node, or one of its partitions (`/dev/ploopNpK`).
public struct PloopNode: Equatable, Sendable {
    public var device: String
    public var partition: Int?

    public init?(_ path: String) {
        if let r = path.range(of: "p", options: .backwards), r.lowerBound > path.startIndex,
            path[path.index(before: r.lowerBound)].isNumber, let k = Int(path[r.upperBound...]), (1...15).contains(k)
        {
            device = String(path[..<r.lowerBound])
            partition = k
        } else {
            device = path
            partition = nil
        }
        guard DeviceName.canonical(device) == device else { return nil }
    }

    /// Where the partition starts on the device, in bytes (0 for the whole device).
    public var offsetBytes: UInt64 {
        guard let k = partition else { return 0 }
        return (PartitionNodes.found(device).first { $0.number == k }?.start ?? 0) * 512
    }
}
