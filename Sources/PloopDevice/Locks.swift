import PloopSystem
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The delta stack under a `ReadWriteLock` (PloopSystem): I/O reads it in shared mode, stack
/// changes (snapshot, the end of a merge, grow) take it exclusively, so they are atomic with
/// respect to I/O; writer-preferring, so a stack change is not starved by a stream of I/O.
///
/// I/O submitted asynchronously outlives the shared hold that started it, so it *pins* the stack
/// instead (taken under the shared lock, released by whichever thread sees the I/O complete): an
/// exclusive holder first waits until no pin is left, so a stack change still never overlaps I/O
/// into the files it changes. New pins cannot start meanwhile (they need the shared lock).
final class StackLock<Value>: Sendable {
    private let lock: ReadWriteLock<Value>
    private let pins = Atomic<Int>(0)

    init(_ value: Value) {
        lock = ReadWriteLock(value)
    }

    func read<T, E: Error>(_ body: (Value) throws(E) -> T) throws(E) -> T {
        try lock.read(body)
    }

    func write<T, E: Error>(_ body: (inout Value) throws(E) -> T) throws(E) -> T {
        try lock.write { (v: inout Value) throws(E) -> T in
            drainPins()
            return try body(&v)
        }
    }

    /// Holds the stack as it is until `unpin`; only while holding it shared.
    func pin() {
        pins.add(1, ordering: .acquiring)
    }

    func unpin() {
        let before = pins.subtract(1, ordering: .releasing).oldValue
        precondition(before > 0, "stack unpinned more often than pinned")
    }

    /// Pinned I/O is a disk request in flight (milliseconds at most); a stack change is rare.
    private func drainPins() {
        var waited = 0
        while pins.load(ordering: .acquiring) > 0 {
            if waited < 64 { sched_yield() } else { usleep(50) }
            waited += 1
        }
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
