import CPloopSys

/// A buffer aligned to 4096 that belongs to the calling thread, kept for its later calls: direct
/// I/O from memory that is not aligned bounces through it, with no allocation per request.
public enum ThreadScratch {
    /// At least `size` bytes, valid until this thread asks again; nil when memory is short.
    public static func buffer(_ size: Int) -> UnsafeMutableRawBufferPointer? {
        cploop_thread_scratch(size).map { UnsafeMutableRawBufferPointer(start: $0, count: size) }
    }
}
