import Foundation
import PloopSystem

/// The file a copy is built in: `DEST.part-PID`, a `TemporaryFile` (exclusive, locked, removed on
/// interruption, a dead receiver's removed by the next one), with errors told in terms of the
/// destination the user named.
final class PartFile {
    let temporary: TemporaryFile
    var file: File { temporary.file }
    var destination: String { temporary.destination }

    init(destination: String, replace: Bool) throws {
        do {
            temporary = try TemporaryFile(destination: destination, suffix: "part", replace: replace)
        } catch {
            switch error {
            case .exists: throw CopyStream.Error.destinationExists(destination)
            case .system(let e): throw CopyStream.Error.io("cannot create the temporary file of \(destination) (\(e.path)): \(e.message)")
            case .notRegular: throw CopyStream.Error.destinationNotRegular(error.description)
            }
        }
        for p in temporary.removedStale {
            FileHandle.standardError.write(Data("ploop copy: removed \(p), left by a copy that did not finish\n".utf8))
        }
    }

    /// Syncs the data and renames the part file to the destination.
    func publish(replace: Bool) throws {
        do { try temporary.publish(replace: replace) } catch { throw CopyStream.Error.io("publishing \(destination): \(error)") }
    }

    /// An I/O error on the part file, told in terms of the destination.
    func failure(_ what: String, _ error: any Error) -> CopyStream.Error {
        let message = (error as? SystemError)?.message ?? "\(error)"
        return .io("\(what) \(destination): \(message)")
    }
}
