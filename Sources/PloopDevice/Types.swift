import PloopFormat
import PloopImage

/// What a mount stacks: images from base (level 0) to top.
public struct MountRequest: Sendable, Codable, Equatable {
    public var images: [String]
    public var baseFormat: ImageFormat
    public var readOnly: Bool
    /// `/dev/ploopN`, or nil for the first free device.
    public var device: String?
    /// Cluster size in sectors; needed only when the stack is a lone raw image (ploop1 deltas
    /// carry theirs). Default 2048 (1 MiB).
    public var clusterSectors: UInt32?
    /// The in-use mark is the caller's, as with dm-ploop (user space marks the top before a table
    /// goes live and clears it after the device is removed): a marked top is accepted, and the
    /// device neither sets nor clears the mark. nil (absent in older state files) is false.
    public var callerOwnsInUse: Bool?

    public init(images: [String], baseFormat: ImageFormat = .ploop1, readOnly: Bool = false, device: String? = nil, clusterSectors: UInt32? = nil, callerOwnsInUse: Bool = false) {
        self.images = images
        self.baseFormat = baseFormat
        self.readOnly = readOnly
        self.device = device
        self.clusterSectors = clusterSectors
        self.callerOwnsInUse = callerOwnsInUse ? true : nil
    }
}

/// `ploop_freeblks_ctl_extent`: `length` free blocks starting at image block `block`, which the
/// BAT maps from virtual clusters starting at `cluster`.
public struct FreeExtent: Sendable, Codable, Equatable, Hashable {
    public var cluster: UInt32
    public var block: UInt32
    public var length: UInt32
    public init(cluster: UInt32, block: UInt32, length: UInt32) {
        self.cluster = cluster
        self.block = block
        self.length = length
    }

    /// (cluster, block) pairs as extents contiguous in both, in block order: what user space
    /// hands to PLOOP_IOC_FREEBLKS and what FBGET answers.
    public static func coalescing(_ pairs: [(cluster: UInt32, block: UInt32)]) -> [FreeExtent] {
        var out: [FreeExtent] = []
        for p in pairs.sorted(by: { $0.block < $1.block }) {
            if var last = out.last, last.block + last.length == p.block, last.cluster + last.length == p.cluster {
                last.length += 1
                out[out.count - 1] = last
            } else {
                out.append(FreeExtent(cluster: p.cluster, block: p.block, length: 1))
            }
        }
        return out
    }
}

/// `ploop_relocblks_ctl_extent`: tail blocks to move; `free` marks blocks that are themselves in
/// the free list (nothing to copy).
public struct RelocExtent: Sendable, Codable, Equatable, Hashable {
    public var cluster: UInt32
    public var block: UInt32
    public var length: UInt32
    public var free: Bool
    public init(cluster: UInt32, block: UInt32, length: UInt32, free: Bool) {
        self.cluster = cluster
        self.block = block
        self.length = length
        self.free = free
    }
}

/// What PLOOP_IOC_BALLOON answers.
public struct BalloonReply: Sendable, Codable, Equatable {
    public var state: MaintenanceState
    /// The frozen allocation head in FBLOADED/RELOC, else the current one.
    public var allocHead: UInt32
    public var level: Int
    public init(state: MaintenanceState, allocHead: UInt32, level: Int) {
        self.state = state
        self.allocHead = allocHead
        self.level = level
    }
}

public struct LevelInfo: Sendable, Codable, Equatable {
    public var level: Int
    public var path: String
    public var format: ImageFormat
    public var readOnly: Bool
    public init(level: Int, path: String, format: ImageFormat, readOnly: Bool) {
        self.level = level
        self.path = path
        self.format = format
        self.readOnly = readOnly
    }
}

public struct MergeProgress: Sendable, Codable, Equatable {
    public var done: Int
    public var total: Int
    public init(done: Int, total: Int) {
        self.done = done
        self.total = total
    }
}

/// How an online merge of the top went: what the passes copied while I/O ran, and the pause at the
/// switch (I/O held while the clusters written since the last pass are copied and the destination
/// flushed). The simulator logs it; tests read it.
public struct MergeReport: Sendable, Equatable {
    /// Passes over the top before the pause.
    public var passes: Int
    /// Clusters copied while I/O ran, counting those copied again.
    public var copied: Int
    /// Writes (and discards) that went to the destination too, their cluster being copied already.
    public var mirrored: Int
    /// Clusters copied during the pause.
    public var pausedClusters: Int
    /// How long I/O was held at the switch.
    public var pauseSeconds: Double
}

public struct DeviceInfo: Sendable, Codable, Equatable {
    public var device: String
    public var backend: String
    public var sizeBytes: UInt64
    public var clusterBytes: Int
    public var state: MaintenanceState
    public var running: Bool
    public var levels: [LevelInfo]
    public var mergeProgress: MergeProgress?
    /// Where the device's server writes its log (the simulator's daemon); nil for the kernel.
    public var log: String?
    public init(device: String, backend: String, sizeBytes: UInt64, clusterBytes: Int, state: MaintenanceState, running: Bool, levels: [LevelInfo], mergeProgress: MergeProgress?) {
        self.device = device
        self.backend = backend
        self.sizeBytes = sizeBytes
        self.clusterBytes = clusterBytes
        self.state = state
        self.running = running
        self.levels = levels
        self.mergeProgress = mergeProgress
    }
}

/// Block I/O on a device, for data paths that must not care which backend serves them.
public protocol DeviceIO: Sendable {
    var sizeBytes: UInt64 { get throws(DeviceError) }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(DeviceError)
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(DeviceError)
    func flush() throws(DeviceError)
    /// Discard: the range reads as zeros afterwards, and the image gives back the space it can.
    /// Offset and length in whole sectors.
    func discard(at offset: UInt64, length: UInt64) throws(DeviceError)
}

/// `reloc_map` of PLOOP_IOC_UPDATE_INDEX: virtual cluster `cluster` now lives in image block `block`.
public struct IndexMap: Sendable, Codable, Equatable, Hashable {
    public var cluster: UInt32
    public var block: UInt32
    public init(cluster: UInt32, block: UInt32) {
        self.cluster = cluster
        self.block = block
    }
}
