/// Explicit little-endian field access on byte arrays. Offsets are checked by the caller's
/// length test; these never reinterpret memory as a struct.
enum LittleEndian {
    static func u32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
    }

    static func u64(_ b: [UInt8], _ at: Int) -> UInt64 {
        UInt64(u32(b, at)) | UInt64(u32(b, at + 4)) << 32
    }

    static func put(_ v: UInt32, _ b: inout [UInt8], _ at: Int) {
        for i in 0..<4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
    }

    static func put(_ v: UInt64, _ b: inout [UInt8], _ at: Int) {
        put(UInt32(truncatingIfNeeded: v), &b, at)
        put(UInt32(truncatingIfNeeded: v >> 32), &b, at + 4)
    }
}

extension UnsafeRawBufferPointer {
    /// Little-endian u32 at a byte offset; the caller guarantees the range.
    @inlinable public func loadLE32(at offset: Int) -> UInt32 {
        UInt32(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }
}

extension UnsafeMutableRawBufferPointer {
    @inlinable public func storeLE32(_ value: UInt32, at offset: Int) {
        storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt32.self)
    }
}
