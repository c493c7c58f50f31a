#if canImport(Glibc)
import Glibc
#endif

/// A value guarded by a writer-preferring readers-writer lock (a writer is not starved by a
/// stream of readers). `Synchronization` has no readers-writer lock, hence pthread's.
public final class ReadWriteLock<Value>: @unchecked Sendable {
    // @unchecked: `value` is reached only with the lock held, in `read` or `write`.
    private var lock = pthread_rwlock_t()
    private var value: Value

    public init(_ value: Value) {
        self.value = value
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(&lock, &attr)
        pthread_rwlockattr_destroy(&attr)
    }

    deinit { pthread_rwlock_destroy(&lock) }

    /// Runs `body` with the value, shared with other readers.
    public func read<T, E: Error>(_ body: (Value) throws(E) -> T) throws(E) -> T {
        pthread_rwlock_rdlock(&lock)
        defer { pthread_rwlock_unlock(&lock) }
        return try body(value)
    }

    /// Runs `body` with the value, alone.
    public func write<T, E: Error>(_ body: (inout Value) throws(E) -> T) throws(E) -> T {
        pthread_rwlock_wrlock(&lock)
        defer { pthread_rwlock_unlock(&lock) }
        return try body(&value)
    }
}
