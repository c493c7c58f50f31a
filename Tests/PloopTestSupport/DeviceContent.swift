import PloopDevice
import PloopImage

/// The tests' one pseudo-random sequence (xorshift64): the same seed, the same numbers, so a
/// failing seed reproduces exactly.
public struct XorShift: Sendable {
    public private(set) var state: UInt64

    /// A zero seed would stay zero: it is made odd.
    public init(seed: UInt64) { state = seed | 1 }

    public mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }

    /// A number in 0..<n (0 when n is 0).
    public mutating func below(_ n: Int) -> Int { Int(next() % UInt64(max(n, 1))) }

    public mutating func byte() -> UInt8 { UInt8(truncatingIfNeeded: next()) }

    public mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in byte() } }
}

/// Known contents for device tests, and whole-device reads to compare them with.
public enum DeviceContent {
    /// `n` bytes of a xorshift sequence: the same seed, the same bytes.
    public static func pattern(_ n: Int, seed: UInt64) -> [UInt8] {
        var x = XorShift(seed: seed)
        return x.bytes(n)
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
