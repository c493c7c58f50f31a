import Glibc
import PloopSystem

/// Direct I/O on image files, as the kernel driver opens its images: the file system inside the
/// device caches what it reads, so a second copy in the host's page cache is memory spent twice.
public enum DirectIO {
    /// The environment variable that turns it off for the simulator's daemon (`0`).
    public static let variable = "PLOOP_DIRECT_IO"

    /// `file` with an `O_DIRECT` twin (`PosixBlockFile`), or `file` itself and why it has none:
    /// the host file system refuses `O_DIRECT`, or takes neither 512- nor 4096-byte alignment.
    /// `open` opens the twin (a parameter so that a refusal can be tested).
    public static func twin(
        of file: PosixBlockFile, writable: Bool,
        open: (String, Bool) throws(SystemError) -> File = { path, writable throws(SystemError) in
            try File(path: path, mode: File.OpenMode(write: writable, create: false, exclusive: false, direct: true))
        }
    ) -> (file: PosixBlockFile, note: String?) {
        let direct: File
        do { direct = try open(file.path, writable) } catch {
            return (file, "\(file.path): no direct I/O (\(SystemError.words(error.errno))): through the page cache")
        }
        guard let alignment = alignment(of: direct) else {
            return (file, "\(file.path): direct reads of 512 and 4096 bytes both fail: through the page cache")
        }
        return (PosixBlockFile(file.file, direct: direct, alignment: alignment), nil)
    }

    /// The smallest of 512 and 4096 that a direct read of the file's start takes.
    static func alignment(of direct: File) -> UInt64? {
        guard let buffer = ThreadScratch.buffer(4096) else { return nil }
        for size in [512, 4096] {
            do {
                _ = try direct.readOnce(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<size]), at: 0)
                return UInt64(size)
            } catch {
                guard error.errno == EINVAL else { return nil }
            }
        }
        return nil
    }
}
