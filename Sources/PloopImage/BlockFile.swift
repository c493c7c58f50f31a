import PloopSystem
import Synchronization


/// The byte store under an image: a real file, or memory in tests. The seam through which
/// crash tests stop an operation after any write.
public protocol BlockFile: AnyObject, Sendable {
    var path: String { get }
    /// Reads up to `buffer.count` bytes; fewer only at end of file.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(ImageError) -> Int
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(ImageError)
    /// Makes every earlier write durable.
    func sync() throws(ImageError)
    func truncate(to length: UInt64) throws(ImageError)
    func size() throws(ImageError) -> UInt64
    /// Copies `length` bytes from another file (bytes past its end read as zeros).
    func copy(from source: any BlockFile, at sourceOffset: UInt64, to offset: UInt64, length: Int, scratch: UnsafeMutableRawBufferPointer) throws(ImageError)
    /// Gives [offset, offset+length) real space reading as zeros, extending the file if needed.
    func allocate(at offset: UInt64, length: UInt64) throws(ImageError)
    /// The file descriptor behind the file, for readers that hand it to the kernel (splice); nil
    /// for files not backed by one.
    var descriptor: Int32? { get }
    /// Makes [offset, offset+length) read as zeros, giving its space back where the file system
    /// can (a hole); the size does not change.
    func punchHole(at offset: UInt64, length: UInt64) throws(ImageError)
    /// The parts of [start, end) that may hold data (a file system's holes left out); at worst
    /// the whole range.
    func dataRanges(from start: UInt64, to end: UInt64) throws(ImageError) -> [Range<UInt64>]
}

extension BlockFile {
    public var descriptor: Int32? { nil }

    public func dataRanges(from start: UInt64, to end: UInt64) throws(ImageError) -> [Range<UInt64>] {
        start < end ? [start..<end] : []
    }

    public func readBytes(_ count: Int, at offset: UInt64) throws(ImageError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let n = try rethrowingImageError { try bytes.withUnsafeMutableBytes { b in try read(into: b, at: offset) } }
        if n < count { bytes.removeLast(count - n) }
        return bytes
    }

    public func writeBytes(_ bytes: [UInt8], at offset: UInt64) throws(ImageError) {
        try rethrowingImageError { try bytes.withUnsafeBytes { b in try write(b, at: offset) } }
    }

    /// Writes `count` zero bytes at `offset`, a cluster-sized chunk at a time.
    public func writeZeros(at offset: UInt64, count: UInt64) throws(ImageError) {
        let chunk = [UInt8](repeating: 0, count: Int(min(count, 1 << 20)))
        var done: UInt64 = 0
        while done < count {
            let n = Int(min(UInt64(chunk.count), count - done))
            try rethrowingImageError {
                try chunk.withUnsafeBytes { b in try write(UnsafeRawBufferPointer(rebasing: b[0..<n]), at: offset + done) }
            }
            done += UInt64(n)
        }
    }

    /// Makes [offset, offset+count) read as zeros, extending the file to its end if it is
    /// shorter: whole 4 KiB pages become holes (nothing written: a grown BAT area can be
    /// gigabytes), the ragged edges get zeros.
    public func zeroFill(at offset: UInt64, count: UInt64) throws(ImageError) {
        let end = offset + count
        let lo = (offset + 4095) / 4096 * 4096
        let hi = end / 4096 * 4096
        guard lo < hi else {
            try writeZeros(at: offset, count: count)
            return
        }
        if offset < lo { try writeZeros(at: offset, count: lo - offset) }
        let size = try size()
        if lo < size { try punchHole(at: lo, length: min(hi, size) - lo) }
        if hi < end { try writeZeros(at: hi, count: end - hi) }
        if try self.size() < end { try truncate(to: end) }
    }

    /// Without hole punching: zeros written, up to the end of the file.
    public func punchHole(at offset: UInt64, length: UInt64) throws(ImageError) {
        let end = min(offset + length, try size())
        if end > offset { try writeZeros(at: offset, count: end - offset) }
    }

    public func allocate(at offset: UInt64, length: UInt64) throws(ImageError) {
        // Without fallocate: zeros past the current end only (inside the file there is data already).
        let size = try size()
        if offset + length > size {
            let from = max(offset, size)
            try writeZeros(at: from, count: offset + length - from)
        }
    }

    public func genericCopy(from source: any BlockFile, at sourceOffset: UInt64, to offset: UInt64, length: Int, scratch: UnsafeMutableRawBufferPointer) throws(ImageError) {
        var done = 0
        while done < length {
            let n = min(scratch.count, length - done)
            let chunk = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<n])
            let got = try source.read(into: chunk, at: sourceOffset + UInt64(done))
            if got < n { chunk[got...].initializeMemory(as: UInt8.self, repeating: 0) }
            try write(UnsafeRawBufferPointer(chunk), at: offset + UInt64(done))
            done += n
        }
    }
}

/// Runs a closure whose only errors are `ImageError`s through an untyped `rethrows` API
/// (`withUnsafeBytes`), restoring the typed error.
@inline(__always)
public func rethrowingImageError<T>(_ body: () throws -> T) throws(ImageError) -> T {
    do { return try body() } catch let e as ImageError { throw e } catch { preconditionFailure("unexpected error \(error)") }
}

/// A real file.
public final class PosixBlockFile: BlockFile {
    public let file: File
    public var path: String { file.path }

    public init(_ file: File) { self.file = file }
    public var descriptor: Int32? { file.fd }

    public convenience init(path: String, mode: File.OpenMode) throws(ImageError) {
        do { self.init(try File(path: path, mode: mode)) } catch { throw ImageError.from(error) }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(ImageError) -> Int {
        do { return try file.read(into: buffer, at: offset) } catch { throw .io(error) }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(ImageError) {
        do { try file.write(buffer, at: offset) } catch { throw .io(error) }
    }

    /// fdatasync: the data and what finding it needs (the size) are durable; the times are not
    /// worth a journal commit of the host file system on every flush of a device.
    public func sync() throws(ImageError) {
        do { try file.dataSync() } catch { throw .io(error) }
    }

    public func truncate(to length: UInt64) throws(ImageError) {
        do { try file.truncate(to: length) } catch { throw .io(error) }
    }

    public func size() throws(ImageError) -> UInt64 {
        do { return try file.size() } catch { throw .io(error) }
    }

    public func dataRanges(from start: UInt64, to end: UInt64) throws(ImageError) -> [Range<UInt64>] {
        // SEEK_DATA where the file system has it; else the whole range is read.
        (try? file.dataRanges(from: start, to: end)) ?? (start < end ? [start..<end] : [])
    }

    public func copy(from source: any BlockFile, at sourceOffset: UInt64, to offset: UInt64, length: Int, scratch: UnsafeMutableRawBufferPointer) throws(ImageError) {
        guard let posix = source as? PosixBlockFile else {
            try genericCopy(from: source, at: sourceOffset, to: offset, length: length, scratch: scratch)
            return
        }
        do { try file.copy(from: posix.file, at: sourceOffset, to: offset, length: length, scratch: scratch) } catch { throw .io(error) }
    }

    public func punchHole(at offset: UInt64, length: UInt64) throws(ImageError) {
        do { try file.punchHole(at: offset, length: length) } catch {
            // A file system without holes: zeros do the same for readers.
            guard error.code == .notSupported else { throw .io(error) }
            let end = min(offset + length, try size())
            if end > offset { try writeZeros(at: offset, count: end - offset) }
        }
    }

    public func allocate(at offset: UInt64, length: UInt64) throws(ImageError) {
        do {
            if try file.allocate(at: offset, length: length) { return }
        } catch { throw .io(error) }
        let size = try size()
        if offset + length > size {
            let from = max(offset, size)
            try writeZeros(at: from, count: offset + length - from)
        }
    }
}

/// An image held in memory: for tests, and for materialising crash states.
public final class MemoryBlockFile: BlockFile {
    public let path: String
    private let bytes: Mutex<[UInt8]>

    public init(path: String = "<memory>", bytes: [UInt8] = []) {
        self.path = path
        self.bytes = Mutex(bytes)
    }

    public var contents: [UInt8] { bytes.withLock { $0 } }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(ImageError) -> Int {
        bytes.withLock { b in
            guard offset < UInt64(b.count) else { return 0 }
            let n = min(buffer.count, b.count - Int(offset))
            b.withUnsafeBytes { src in
                buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[Int(offset)..<Int(offset) + n]))
            }
            return n
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(ImageError) {
        bytes.withLock { b in
            let end = Int(offset) + buffer.count
            if end > b.count { b.append(contentsOf: repeatElement(0, count: end - b.count)) }
            b.withUnsafeMutableBytes { dst in
                UnsafeMutableRawBufferPointer(rebasing: dst[Int(offset)..<end]).copyMemory(from: buffer)
            }
        }
    }

    public func sync() throws(ImageError) {}

    public func truncate(to length: UInt64) throws(ImageError) {
        bytes.withLock { b in
            if Int(length) < b.count { b.removeLast(b.count - Int(length)) } else { b.append(contentsOf: repeatElement(0, count: Int(length) - b.count)) }
        }
    }

    public func size() throws(ImageError) -> UInt64 { UInt64(bytes.withLock { $0.count }) }

    public func copy(from source: any BlockFile, at sourceOffset: UInt64, to offset: UInt64, length: Int, scratch: UnsafeMutableRawBufferPointer) throws(ImageError) {
        try genericCopy(from: source, at: sourceOffset, to: offset, length: length, scratch: scratch)
    }
}

/// A count of mutating file calls (write, sync, truncate, allocate, punch, copy) that may still
/// happen; the next one fails. One budget can be shared by every file of an operation, so "the
/// Nth change anywhere" is a crash point (or a fault point). Unarmed, it never fires.
public final class CrashBudget: Sendable {
    /// What the call that spends the budget does.
    public enum Failure: Sendable, Equatable {
        /// Fails with `injectedCrash`, and so does every call after it: a process killed there.
        case crash
        /// Fails with this errno (as the disk's error, naming the call and the file); the calls
        /// after it succeed (`sticky`: fail too, a disk that stays bad).
        case error(Int32, sticky: Bool)
    }

    private let remaining: Mutex<Int?>
    public let failure: Failure

    public init(_ calls: Int? = nil, failure: Failure = .crash) {
        remaining = Mutex(calls)
        self.failure = failure
    }

    /// Allows `n` more calls, then fails the next.
    public func arm(_ n: Int) { remaining.withLock { $0 = n } }

    /// Never fires again.
    public func disarm() { remaining.withLock { $0 = nil } }

    public func step(_ call: String, _ path: String) throws(ImageError) {
        let fires = remaining.withLock { r -> Bool in
            guard let left = r else { return false }
            r = left - 1
            switch failure {
            case .crash, .error(_, sticky: true): return left <= 0
            case .error(_, sticky: false): return left == 0
            }
        }
        guard fires else { return }
        switch failure {
        case .crash: throw .injectedCrash
        case .error(let e, _): throw .io(SystemError(call, path: path, errno: e))
        }
    }

    /// Whether a call failed.
    public var fired: Bool { remaining.withLock { ($0 ?? 0) < 0 } }
    /// How many calls were left (negative: it fired); nil when unarmed.
    public var callsLeft: Int? { remaining.withLock { $0 } }
}

/// Passes everything to another file, but fails with `injectedCrash` once its `CrashBudget` is
/// spent, leaving the earlier calls done: the state a process killed at that point leaves behind.
public final class CrashingBlockFile: BlockFile {
    public let base: any BlockFile
    public let budget: CrashBudget
    public var path: String { base.path }

    /// A budget of its own: the Nth mutating call on this file fails.
    public convenience init(_ base: any BlockFile, crashAt: Int) {
        self.init(base, budget: CrashBudget(crashAt))
    }

    public init(_ base: any BlockFile, budget: CrashBudget) {
        self.base = base
        self.budget = budget
    }

    /// How many mutating calls were left when the operation ended (negative: it crashed).
    public var callsLeft: Int { budget.callsLeft ?? 0 }

    private func step(_ call: String) throws(ImageError) { try budget.step(call, base.path) }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(ImageError) -> Int {
        try base.read(into: buffer, at: offset)
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(ImageError) {
        try step("write")
        try base.write(buffer, at: offset)
    }
    public func sync() throws(ImageError) {
        try step("fsync")
        try base.sync()
    }
    public func truncate(to length: UInt64) throws(ImageError) {
        try step("ftruncate")
        try base.truncate(to: length)
    }
    public func size() throws(ImageError) -> UInt64 { try base.size() }
    public func allocate(at offset: UInt64, length: UInt64) throws(ImageError) {
        try step("fallocate")
        try base.allocate(at: offset, length: length)
    }
    public func punchHole(at offset: UInt64, length: UInt64) throws(ImageError) {
        try step("fallocate")
        try base.punchHole(at: offset, length: length)
    }
    public func copy(from source: any BlockFile, at sourceOffset: UInt64, to offset: UInt64, length: Int, scratch: UnsafeMutableRawBufferPointer) throws(ImageError) {
        try step("copy_file_range")
        try base.copy(from: source, at: sourceOffset, to: offset, length: length, scratch: scratch)
    }
}
