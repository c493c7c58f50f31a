import Foundation
import PloopDevice
import PloopImage
import PloopSystem

/// Where simulated devices keep their runtime state: one directory per device under the runtime
/// root (`/run/ploop`, or `PLOOP_RUN_DIR`), holding the control socket, the FUSE file the loop
/// device reads, the daemon's log and `state.json`.
public struct RuntimePaths: Sendable {
    public var root: String

    public init(root: String? = nil) {
        self.root = root ?? ProcessInfo.processInfo.environment["PLOOP_RUN_DIR"] ?? "/run/ploop"
    }

    public func directory(_ index: Int) -> String { "\(root)/ploop\(index)" }
    public func socket(_ index: Int) -> String { directory(index) + "/control.sock" }
    public func state(_ index: Int) -> String { directory(index) + "/state.json" }
    public func fuseFile(_ index: Int) -> String { directory(index) + "/device" }
    public func log(_ index: Int) -> String { directory(index) + "/daemon.log" }
    public var lock: String { root + "/.lock" }

    /// Device indexes with a runtime directory.
    public func indexes() -> [Int] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        return names.compactMap { DeviceName.index($0) }.sorted()
    }

    public func ensureRoot() throws {
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
    }
}

/// What a running (or crashed) simulated device is, kept beside its socket and written
/// atomically, so `list`, `balloon status` and `umount` work after the daemon died.
public struct RuntimeState: Codable, Sendable, Equatable {
    public var version = 1
    public var device: String
    public var index: Int
    public var pid: Int32
    public var images: [String]
    public var baseFormat: ImageFormat
    public var readOnly: Bool
    public var clusterBytes: Int
    public var sizeBytes: UInt64
    public var loop: String
    public var fuseFile: String
    public var state: MaintenanceState
    /// A node the user made (`mknod /dev/ploopN b 182 M`) that we replaced; restored on umount.
    public var replacedNode: [UInt32]?

    public static func read(_ path: String) -> RuntimeState? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        return try? JSONDecoder().decode(RuntimeState.self, from: data)
    }

    /// Writes to a temporary file, syncs it, renames it over the old one and syncs the directory.
    public func write(_ path: String) throws {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try PathInfo.writeAtomically(Array(try enc.encode(self)), to: path, replace: true)
    }
}

