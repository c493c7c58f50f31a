import PloopDevice

/// The text dm-ploop speaks (reference dm-ploop.md §1.3, §2, §3): the parameters of its table
/// line, its status line, and the target messages, written as ploop user space 9.x writes them and
/// parsed as the kernel parses them (the fake device-mapper uses the parsers).
public enum DMPloop {
    public static let targetType = "ploop"
    /// The device-mapper target a copy puts on a device to see its writes, and the suffix of the
    /// name of the second ploop device it feeds (`ploopN.tracking`).
    public static let trackingType = "tracking"
    public static let trackingSuffix = ".tracking"
    /// The device-mapper name of device M, and its node.
    public static func name(_ minor: Int) -> String { "ploop\(minor)" }
    public static func node(_ minor: Int) -> String { node(named: name(minor)) }
    /// The node of the device-mapper device `name` (`ploopN`, as `name(_:)` makes it).
    public static func node(named name: String) -> String { "/dev/mapper/\(name)" }

    /// The parameters of a ploop table: `<cluster_log> [falloc_new_clu] <fd base> … <fd top>`,
    /// the base optionally `raw@<fd>`.
    public struct Table: Sendable, Equatable {
        public var clusterLog: Int
        public var fallocNewCluster: Bool
        /// Base first, top last: descriptors in the process that loads the table.
        public var fds: [Int32]
        public var rawBase: Bool
        /// `off=N`: sectors skipped at the start (ploop user space never sets it).
        public var offset: UInt64?

        public init(clusterLog: Int, fds: [Int32], fallocNewCluster: Bool = false, rawBase: Bool = false, offset: UInt64? = nil) {
            self.clusterLog = clusterLog
            self.fds = fds
            self.fallocNewCluster = fallocNewCluster
            self.rawBase = rawBase
            self.offset = offset
        }

        /// 2^clusterLog sectors per cluster: 11 for 1 MiB.
        public static func clusterLog(sectors: UInt32) -> Int { sectors.trailingZeroBitCount }

        public var params: String {
            var words = [String(clusterLog)]
            if fallocNewCluster { words.append("falloc_new_clu") }
            if let o = offset { words.append("off=\(o)") }
            for (i, fd) in fds.enumerated() { words.append(i == 0 && rawBase ? "raw@\(fd)" : String(fd)) }
            return words.joined(separator: " ")
        }

        /// As the kernel's constructor reads them: EINVAL for what it refuses to parse.
        public init(parsing params: String) throws(DeviceError) {
            let words = params.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
            guard words.count >= 2 else { throw .invalid("ploop table '\(params)': fewer than 2 arguments (EINVAL)") }
            guard let log = Int(words[0]), (0...30).contains(log) else { throw .invalid("ploop table '\(params)': could not parse cluster_log (EINVAL)") }
            var falloc = false
            var offset: UInt64?
            var i = 1
            while i < words.count {
                if words[i] == "falloc_new_clu" { falloc = true } else if words[i].hasPrefix("off="), let o = UInt64(words[i].dropFirst(4)) { offset = o } else { break }
                i += 1
            }
            var fds: [Int32] = []
            var raw = false
            for (k, w) in words[i...].enumerated() {
                if w.hasPrefix("raw@") {
                    guard k == 0, let fd = Int32(w.dropFirst(4)) else { throw .invalid("ploop table '\(params)': raw@ only for the base (EINVAL)") }
                    raw = true
                    fds.append(fd)
                } else {
                    guard let fd = Int32(w) else { throw .invalid("ploop table '\(params)': '\(w)' is not a descriptor (EINVAL)") }
                    fds.append(fd)
                }
            }
            guard !fds.isEmpty else { throw .invalid("ploop table '\(params)': no deltas (EINVAL)") }
            guard fds.count <= 253 else { throw .invalid("ploop table '\(params)': more than 253 deltas (EINVAL)") }
            self.init(clusterLog: log, fds: fds, fallocNewCluster: falloc, rawBase: raw, offset: offset)
        }
    }

    /// The status line: `<deltas> v2 <cluster sectors> <flags>[ off=N]`.
    public struct Status: Sendable, Equatable {
        public var deltas: Int
        public var clusterSectors: Int
        /// `f` falloc_new_clu, `t` in-target tracking, `n` noresume, `s` ENOSPC pending; "o" alone
        /// when none.
        public var flags: String

        public init(deltas: Int, clusterSectors: Int, flags: String = "o") {
            self.deltas = deltas
            self.clusterSectors = clusterSectors
            self.flags = flags
        }

        public var text: String { "\(deltas) v2 \(clusterSectors) \(flags.isEmpty ? "o" : flags)" }

        /// As user space reads it (`%d %2s %d`); anything else is malformed.
        public init(parsing s: String) throws(DeviceError) {
            let w = s.split(separator: " ").map(String.init)
            guard w.count >= 3, let n = Int(w[0]), w[1] == "v2", let cs = Int(w[2]), n > 0, cs > 0 else {
                throw .invalid("malformed ploop params '\(s)'")
            }
            self.init(deltas: n, clusterSectors: cs, flags: w.count > 3 ? w[3] : "o")
        }
    }

    /// The target messages ploop user space sends to a ploop target, and the tracking target's.
    public enum Message: Sendable, Equatable {
        case getImageName(level: Int)
        case merge
        case notifyMergedBackward(level: Int)
        /// Cluster → new file cluster of level `level`.
        case updateDeltaIndex(level: Int, map: [(cluster: UInt32, block: UInt32)])
        case resize(sectors: UInt64)
        case setNoResume(Bool)
        case flipUpperDeltas
        case trackingStart
        case trackingStop
        case trackingClear(cluster: UInt64)
        case trackingGetNext

        public var text: String {
            switch self {
            case .getImageName(let l): "get_img_name \(l)"
            case .merge: "merge"
            case .notifyMergedBackward(let l): "notify_merged_backward \(l)"
            case .updateDeltaIndex(let l, let map): "update_delta_index \(l) " + map.map { "\($0.cluster):\($0.block);" }.joined()
            case .resize(let s): "resize \(s)"
            case .setNoResume(let on): "set_noresume \(on ? 1 : 0)"
            case .flipUpperDeltas: "flip_upper_deltas"
            case .trackingStart: "tracking_start"
            case .trackingStop: "tracking_stop"
            case .trackingClear(let c): "tracking_clear \(c)"
            case .trackingGetNext: "tracking_get_next"
            }
        }

        /// As the kernel reads a message: unknown verbs are ENOTSUPP, bad arguments EINVAL.
        public init(parsing text: String) throws(DMMessageError) {
            let w = text.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
            guard let verb = w.first else { throw .invalidArgument }
            func int(_ i: Int) throws(DMMessageError) -> Int {
                guard w.count == i + 1, let v = Int(w[i]), v >= 0 else { throw .invalidArgument }
                return v
            }
            func noArgs() throws(DMMessageError) { guard w.count == 1 else { throw .invalidArgument } }
            switch verb {
            case "get_img_name": self = .getImageName(level: try int(1))
            case "merge": try noArgs(); self = .merge
            case "notify_merged_backward": self = .notifyMergedBackward(level: try int(1))
            case "update_delta_index":
                guard w.count == 3, let l = Int(w[1]) else { throw .invalidArgument }
                var map: [(UInt32, UInt32)] = []
                for pair in w[2].split(separator: ";") {
                    let p = pair.split(separator: ":")
                    guard p.count == 2, let c = UInt32(p[0]), let b = UInt32(p[1]) else { throw .invalidArgument }
                    map.append((c, b))
                }
                self = .updateDeltaIndex(level: l, map: map)
            case "resize":
                guard w.count == 2, let s = UInt64(w[1]) else { throw .invalidArgument }
                self = .resize(sectors: s)
            case "set_noresume":
                guard w.count == 2, w[1] == "0" || w[1] == "1" else { throw .invalidArgument }
                self = .setNoResume(w[1] == "1")
            case "flip_upper_deltas": try noArgs(); self = .flipUpperDeltas
            case "tracking_start": try noArgs(); self = .trackingStart
            case "tracking_stop": try noArgs(); self = .trackingStop
            case "tracking_clear":
                guard w.count == 2, let c = UInt64(w[1]) else { throw .invalidArgument }
                self = .trackingClear(cluster: c)
            case "tracking_get_next": try noArgs(); self = .trackingGetNext
            default: throw .unsupported
            }
        }

        public static func == (a: Message, b: Message) -> Bool { a.text == b.text }
    }
}

/// Why a target refused a message, as its errno.
public enum DMMessageError: Error, Equatable {
    /// EINVAL
    case invalidArgument
    /// ENOTSUPP (524): the target has no such verb.
    case unsupported
}
