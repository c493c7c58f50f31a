import PloopSystem
import Synchronization

/// The delta stack is a `ReadWriteLock` (PloopSystem): I/O reads it in shared mode, stack
/// changes (snapshot, the end of a merge, grow) take it exclusively, so they are atomic with
/// respect to I/O; writer-preferring, so a stack change is not starved by a stream of I/O.
typealias StackLock = ReadWriteLock

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
