import PloopDevice
import PloopImage

/// Known contents for device tests, and whole-device reads to compare them with.
public enum DeviceContent {
    /// `n` bytes of a xorshift sequence: the same seed, the same bytes.
    public static func pattern(_ n: Int, seed: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: n)
        var x = seed | 1
        for i in 0..<n {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            b[i] = UInt8(truncatingIfNeeded: x)
        }
        return b
    }

    /// Every byte of a device.
    public static func readAll(_ io: any DeviceIO) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Int(try io.sizeBytes))
        try out.withUnsafeMutableBytes { try io.read(into: $0, at: 0) }
        return out
    }
}

/// What an image holds, read through the engine.
public enum ImageContent {
    /// Every stored cluster of a ploop1 image with its bytes.
    public static func clusters(_ path: String) throws -> [UInt64: [UInt8]] {
        let image = try Ploop1Image(file: try ImagePath.open(path, write: false), writable: false)
        var out: [UInt64: [UInt8]] = [:]
        var b = [UInt8](repeating: 0, count: image.clusterBytes)
        for (c, _) in image.allocatedClusters() {
            _ = try b.withUnsafeMutableBytes { try image.read(cluster: c, into: $0) }
            out[c.value] = b
        }
        return out
    }
}
