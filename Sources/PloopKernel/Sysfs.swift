import Foundation
import PloopDevice
import PloopImage

/// What the kernel driver shows of a device in sysfs (`/sys/block/ploopN/pstate` and `pdelta/`).
public struct KernelDeviceState: Sendable, Equatable {
    public struct Delta: Sendable, Equatable {
        public var level: Int
        public var image: String
        public var format: ImageFormat
        public var readOnly: Bool
        public var io: String?
    }

    public var running: Bool
    /// Cluster size in sectors (`pstate/block_size`).
    public var blockSize: UInt32
    public var formatVersion: Int?
    public var top: Int?
    public var cookie: String?
    public var deltas: [Delta]
    /// The block device's size in 512-byte sectors (`/sys/block/ploopN/size`).
    public var sizeSectors: UInt64?

    public enum Error: Swift.Error, Equatable, CustomStringConvertible {
        case missing(String)
        case malformed(String, String)
        public var description: String {
            switch self {
            case .missing(let p): "\(p) is missing: is this a ploop device of the kernel driver?"
            case .malformed(let p, let v): "\(p) holds \"\(v)\", not what the kernel writes there"
            }
        }
    }

    /// Reads `<root>/block/ploopN` (root is `/sys` on a real host, a fixture tree in tests).
    public static func read(sysfs root: String = "/sys", index: Int) throws(Error) -> KernelDeviceState {
        let dev = "\(root)/block/ploop\(index)"
        func text(_ rel: String, required: Bool = true) throws(Error) -> String? {
            let p = "\(dev)/\(rel)"
            guard let s = try? String(contentsOfFile: p, encoding: .utf8) else {
                if required { throw .missing(p) }
                return nil
            }
            return s.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        func number(_ rel: String, required: Bool = true) throws(Error) -> Int? {
            guard let t = try text(rel, required: required) else { return nil }
            guard let n = Int(t) else { throw .malformed("\(dev)/\(rel)", t) }
            return n
        }
        let running = try number("pstate/running")! != 0
        guard let bs = try number("pstate/block_size"), bs > 0, let bs32 = UInt32(exactly: bs) else {
            throw .malformed("\(dev)/pstate/block_size", (try? text("pstate/block_size")) ?? nil ?? "")
        }
        var deltas: [Delta] = []
        let levels = ((try? FileManager.default.contentsOfDirectory(atPath: "\(dev)/pdelta")) ?? []).compactMap(Int.init).sorted()
        for l in levels {
            let image = try text("pdelta/\(l)/image")!
            let fmt = try text("pdelta/\(l)/format")!
            guard let format = ImageFormat(rawValue: fmt) else { throw .malformed("\(dev)/pdelta/\(l)/format", fmt) }
            let ro = try number("pdelta/\(l)/ro")! != 0
            deltas.append(Delta(level: l, image: image, format: format, readOnly: ro, io: try text("pdelta/\(l)/io", required: false)))
        }
        return KernelDeviceState(
            running: running, blockSize: bs32, formatVersion: try number("pstate/fmt_version", required: false),
            top: try number("pstate/top", required: false), cookie: try text("pstate/cookie", required: false), deltas: deltas,
            sizeSectors: try number("size", required: false).map { UInt64($0) })
    }

    /// The indexes of the ploop devices sysfs shows (`<root>/block/ploopN`), ascending.
    public static func indexes(sysfs root: String = "/sys") -> [Int] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "\(root)/block")) ?? []
        return names.compactMap { DeviceName.index($0) }.sorted()
    }

    /// Whether the kernel driver is loaded, and whether it supports large (v2) images.
    public static func module(sysfs root: String = "/sys") -> (loaded: Bool, largeDisks: Bool) {
        let m = "\(root)/module/ploop"
        return (FileManager.default.fileExists(atPath: m), FileManager.default.fileExists(atPath: m + "/parameters/large_disk_support"))
    }
}
