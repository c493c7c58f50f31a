import Foundation
import PloopCopy
import PloopDevice
import PloopFormat
import PloopImage
import PloopSimulator

extension FuzzTarget {
    /// Valid inputs to start a corpus from, made by this build's own writers (the descriptors
    /// recorded from the original tool in fixtures/original-v7 are added by scripts/fuzz).
    public func seeds() -> [(name: String, bytes: [UInt8])] {
        switch self {
        case .header:
            return Self.images().map { ($0.name, Array($0.bytes.prefix(PloopSpec.headerSize))) }
        case .image:
            return Self.images()
        case .descriptor:
            return []
        case .control:
            let requests: [Wire.Request] = [
                .info, .umount, .snapshot(newDelta: "/d/root.hds.1"), .merge(from: 0, to: 2), .grow(sizeSectors: 1 << 21), .sync,
                .deleteDelta(level: 1), .updateIndex(level: 0, maps: [IndexMap(cluster: 3, block: 9)]),
                .balloon(inflate: true, keepIntact: false), .loadFreeBlocks(level: 0, extents: [FreeExtent(cluster: 1, block: 4, length: 2)]),
                .relocateBlocks(level: 0, allocHead: 12, extents: [RelocExtent(cluster: 2, block: 5, length: 1, free: false)]),
                .trackSetPosition(4096), .trackRead,
            ]
            var out = requests.enumerated().compactMap { i, r -> (String, [UInt8])? in
                guard let json = try? JSONEncoder().encode(Wire.Message(r)) else { return nil }
                return ("request-\(i)", Array(json))
            }
            let launch = Wire.Launch(index: 3, threads: 2, runDir: "/run/ploop", request: MountRequest(images: ["/d/root.hds"], device: "/dev/ploop3"))
            if let json = try? JSONEncoder().encode(launch) { out.append(("launch", Array(json))) }
            return out
        case .stream:
            let records: [[CopyStream.Record]] = [
                [.data(position: 4096, bytes: [UInt8](repeating: 3, count: 2000)), .sync, .data(position: 0, bytes: [UInt8](repeating: 5, count: 300)), .end],
                [.data(position: 1 << 20, bytes: Array("ploop copy".utf8)), .end],
                [.sync, .end],
            ]
            return records.enumerated().map { i, rs in ("stream-\(i)", rs.flatMap(CopyStream.encode)) }
        }
    }

    /// Small images (32 KiB clusters): each version, empty, with data, one left in use.
    static func images() -> [(name: String, bytes: [UInt8])] {
        var out: [(String, [UInt8])] = []
        for version in FormatVersion.allCases {
            for (name, clusters, written, inUse) in [("empty", UInt64(4), [UInt64](), false), ("data", 4, [0, 2, 3], false), ("inuse", 6, [5, 1], true)] {
                let file = MemoryBlockFile(path: "<seed>")
                do {
                    let h = try ImageHeader.new(sizeSectors: clusters * 64, clusterSectors: 64, version: version)
                    try Ploop1Image.create(on: file, header: h)
                    let image = try Ploop1Image(file: file, writable: true)
                    for c in written {
                        var b = [UInt8](repeating: UInt8(truncatingIfNeeded: c &+ 1), count: image.clusterBytes)
                        b[0] = 0x50
                        try b.withUnsafeBytes { try image.write(cluster: ClusterIndex(c), data: $0) }
                    }
                    try image.flush()
                    if !inUse { try image.close() }
                } catch { continue }
                out.append(("\(version)-\(name)", file.contents))
            }
        }
        return out
    }
}
