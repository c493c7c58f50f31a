import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A value guarded by a readers-writer lock: I/O reads the delta stack in shared mode, stack
/// changes (snapshot, the end of a merge, grow) take it exclusively, so they are atomic with
/// respect to I/O. Writer-preferring, so a stack change is not starved by a stream of I/O.
final class StackLock<Value>: @unchecked Sendable {
    private var lock = pthread_rwlock_t()
    private var value: Value

    init(_ value: Value) {
        self.value = value
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        // PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP
        pthread_rwlockattr_setkind_np(&attr, 2)
        pthread_rwlock_init(&lock, &attr)
        pthread_rwlockattr_destroy(&attr)
    }

    deinit { pthread_rwlock_destroy(&lock) }

    func read<T, E: Error>(_ body: (Value) throws(E) -> T) throws(E) -> T {
        pthread_rwlock_rdlock(&lock)
        defer { pthread_rwlock_unlock(&lock) }
        return try body(value)
    }

    func write<T, E: Error>(_ body: (inout Value) throws(E) -> T) throws(E) -> T {
        pthread_rwlock_wrlock(&lock)
        defer { pthread_rwlock_unlock(&lock) }
        return try body(&value)
    }
}

/// Per-cluster lockout: I/O and maintenance on the same virtual cluster are serialised; different
/// clusters proceed in parallel (striped, so memory does not grow with the device).
final class ClusterLocks: Sendable {
    private final class Stripe: Sendable {
        let mutex = Mutex(())
    }

    private let stripes: [Stripe]

    init(count: Int = 1024) {
        stripes = (0..<count).map { _ in Stripe() }
    }

    func sameStripe(_ a: UInt64, _ b: UInt64) -> Bool {
        a % UInt64(stripes.count) == b % UInt64(stripes.count)
    }

    /// Runs `body` under the cluster's lock if it is free now; nil if it is held.
    func tryWith<T, E: Error>(_ cluster: UInt64, _ body: () throws(E) -> T) throws(E) -> T? {
        let s = stripes[Int(cluster % UInt64(stripes.count))]
        var result: Result<T, E>?
        s.mutex.withLockIfAvailable { _ in
            do throws(E) { result = .success(try body()) } catch { result = .failure(error) }
        }
        return try result?.get()
    }

    func with<T, E: Error>(_ cluster: UInt64, _ body: () throws(E) -> T) throws(E) -> T {
        let s = stripes[Int(cluster % UInt64(stripes.count))]
        return try s.mutex.withLock { _ throws(E) -> T in try body() }
    }
}
