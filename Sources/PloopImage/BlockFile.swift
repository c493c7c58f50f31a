import Glibc
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
    /// The descriptor a reader hands to the kernel for [offset, offset+length): the direct one
    /// where the file has it and the range suits it, else `descriptor`.
    func descriptor(forReadingAt offset: UInt64, length: Int) -> Int32?
    /// The `O_DIRECT` descriptor for [offset, offset+length) when the file has one and the range
    /// suits it (asynchronous I/O from aligned buffers: it bypasses this file's own code, so it
    /// must not meet the page cache); nil otherwise.
    func directDescriptor(at offset: UInt64, length: Int) -> Int32?
    /// Says where the image's metadata (header and BAT) end: below it every I/O goes through the
    /// page cache, so a write of part of a metadata page never meets a direct write of the same
    /// page. Only ever raised.
    func metadataEnds(at offset: UInt64)
}

extension BlockFile {
    public var descriptor: Int32? { nil }
    public func descriptor(forReadingAt offset: UInt64, length: Int) -> Int32? { descriptor }
    public func directDescriptor(at offset: UInt64, length: Int) -> Int32? { nil }
    public func metadataEnds(at offset: UInt64) {}

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

/// A real file. With a direct twin (the same file opened `O_DIRECT`, as the kernel driver opens
/// its images), I/O at or past the metadata whose offset and length are multiples of the twin's
/// alignment goes through it, bypassing the host's page cache: the file system inside the device
/// caches those bytes already. Memory that is not aligned bounces through a buffer of the
/// thread's. Everything else (the header and BAT, an odd-sized tail, copies) takes the page
/// cache, which the kernel keeps coherent with direct I/O done before or after it.
public final class PosixBlockFile: BlockFile {
    public let file: File
    public var path: String { file.path }
    /// The `O_DIRECT` twin, and the alignment of offsets and lengths it takes.
    public let direct: File?
    public let directAlignment: UInt64
    private let floor = Atomic<UInt64>(0)

    public init(_ file: File) {
        self.file = file
        direct = nil
        directAlignment = 0
    }

    /// `file` with its direct twin `direct`, which takes offsets and lengths that are multiples
    /// of `alignment` (a power of two from 512 to 4096).
    public init(_ file: File, direct: File, alignment: UInt64) {
        precondition(alignment >= 512 && alignment <= 4096 && alignment & (alignment - 1) == 0, "direct I/O alignment \(alignment)")
        self.file = file
        self.direct = direct
        directAlignment = alignment
    }

    public var descriptor: Int32? { file.fd }

    public convenience init(path: String, mode: File.OpenMode) throws(ImageError) {
        do { self.init(try File(path: path, mode: mode)) } catch { throw ImageError.from(error) }
    }

    public func metadataEnds(at offset: UInt64) {
        _ = floor.max(offset, ordering: .relaxed)
    }

    /// Where the metadata end, as last said (0: nothing said).
    public var metadataEnd: UInt64 { floor.load(ordering: .relaxed) }

    /// The direct twin, if [offset, offset+length) suits it.
    @inline(__always)
    private func directFile(_ offset: UInt64, _ length: Int) -> File? {
        guard let direct, length > 0 else { return nil }
        let mask = directAlignment - 1
        guard offset & mask == 0, UInt64(length) & mask == 0, offset >= floor.load(ordering: .relaxed) else { return nil }
        return direct
    }

    public func descriptor(forReadingAt offset: UInt64, length: Int) -> Int32? {
        directFile(offset, length)?.fd ?? file.fd
    }

    public func directDescriptor(at offset: UInt64, length: Int) -> Int32? {
        // The test hooks count and record changes in `File`: I/O they cannot see is not handed out.
        guard !CrashPoint.watching else { return nil }
        return directFile(offset, length)?.fd
    }

    @inline(__always)
    private static func aligned(_ p: UnsafeRawPointer?) -> Bool { UInt(bitPattern: p) & 4095 == 0 }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(ImageError) -> Int {
        guard let d = directFile(offset, buffer.count) else {
            do { return try file.read(into: buffer, at: offset) } catch { throw .io(error) }
        }
        var done = 0
        while done < buffer.count {
            let n = min(buffer.count - done, Self.bounceBytes)
            let at = offset + UInt64(done)
            let got: Int
            do throws(SystemError) {
                if Self.aligned(buffer.baseAddress.map { UnsafeRawPointer($0) }?.advanced(by: done)) {
                    got = try d.readOnce(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n]), at: at)
                } else {
                    guard let b = ThreadScratch.buffer(n) else { throw SystemError("read", path: path, errno: ENOMEM) }
                    got = try d.readOnce(into: b, at: at)
                    UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + got]).copyMemory(from: UnsafeRawBufferPointer(rebasing: b[0..<got]))
                }
            } catch { throw .io(error) }
            done += got
            if got == 0 { break }
            if got < n {
                // The end of the file, or a short read: what is left (if anything) is not
                // aligned any more, and the page cache reads it.
                do { done += try file.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: offset + UInt64(done)) } catch { throw .io(error) }
                break
            }
        }
        return done
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(ImageError) {
        guard let d = directFile(offset, buffer.count) else {
            do { try file.write(buffer, at: offset) } catch { throw .io(error) }
            return
        }
        do throws(SystemError) {
            if Self.aligned(buffer.baseAddress) {
                try d.write(buffer, at: offset)
                return
            }
            var done = 0
            while done < buffer.count {
                let n = min(buffer.count - done, Self.bounceBytes)
                guard let b = ThreadScratch.buffer(n) else { throw SystemError("write", path: path, errno: ENOMEM) }
                b.copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[done..<done + n]))
                try d.write(UnsafeRawBufferPointer(b), at: offset + UInt64(done))
                done += n
            }
        } catch { throw .io(error) }
    }

    /// The most a bounce through the thread's buffer moves at once (a multiple of 4096).
    static let bounceBytes = 1 << 20

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
    public func metadataEnds(at offset: UInt64) { base.metadataEnds(at: offset) }

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
