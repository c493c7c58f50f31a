/// Cylinders/heads/sectors as the original's `ConvertToCHS` computes them. Cosmetic: neither the
/// kernel nor QEMU reads them, but images we make carry the same values as the original's.
public struct CHSGeometry: Equatable, Sendable {
    public var cylinders: UInt32
    public var heads: UInt32
    public var sectorsPerTrack: UInt32

    public init(sectors size: UInt64) {
        // ATA-style translation for mid-sized disks (about 504 MiB to 8 GiB): 16 heads × 63 sectors.
        if size > 1_032_192 && size < 16_777_216 {
            self.init(cylinders: Self.clamp(size / (16 * 63)), heads: 16, sectorsPerTrack: 63)
            return
        }
        for spt: UInt64 in [63, 32, 16, 8] {
            for heads: UInt64 in [16, 8, 4, 2] where size % (spt * heads) == 0 {
                self.init(cylinders: Self.clamp(size / (spt * heads)), heads: UInt32(heads), sectorsPerTrack: UInt32(spt))
                return
            }
        }
        self.init(cylinders: Self.clamp(size), heads: 1, sectorsPerTrack: 1)
    }

    public init(cylinders: UInt32, heads: UInt32, sectorsPerTrack: UInt32) {
        self.cylinders = cylinders
        self.heads = heads
        self.sectorsPerTrack = sectorsPerTrack
    }

    private static func clamp(_ v: UInt64) -> UInt32 { UInt32(clamping: v) }
}
