import Foundation
import PloopCopy
import PloopDisk
import PloopFormat
import PloopImage
import PloopSimulator

/// What a fuzz input broke: an invariant of the parser or the checker, with what was seen. A
/// trap (an overflow, an index out of range) is the other way to fail; libFuzzer catches both.
public struct FuzzViolation: Error, CustomStringConvertible {
    public var target: FuzzTarget
    public var what: String
    public var description: String { "\(target.rawValue): \(what)" }
}

/// The parsers of untrusted bytes, each with the invariants every input must keep. One input is
/// one call of `run`; the same function serves libFuzzer (`ploop-fuzz` built with
/// `-sanitize=fuzzer`, see scripts/fuzz), the replay of a corpus, and the regression tests.
public enum FuzzTarget: String, CaseIterable, Sendable {
    /// `ImageHeader.decode`: any 64+ bytes; what decodes re-encodes to the same header, and its
    /// BAT geometry is computable.
    case header
    /// `ploop check` on an arbitrary image file: the read-only check changes no byte; the repair
    /// grows the file by no more than the zeros of a half-written last cluster and a copy of each
    /// shared block, and leaves an image a second check finds clean
    /// or still (and only) fatal; a clean image's every cluster can be read.
    case image
    /// DiskDescriptor.xml: what parses writes back to text that parses to the same descriptor.
    case descriptor
    /// The simulator's control requests and launch description (JSON lines from a socket).
    case control
    /// The copy stream receiver: on success the destination alone exists, on failure nothing.
    case stream

    public func run(_ data: [UInt8]) throws(FuzzViolation) {
        switch self {
        case .header: try header(data)
        case .image: try image(data)
        case .descriptor: try descriptor(data)
        case .control: control(data)
        case .stream: try stream(data)
        }
    }

    func fail(_ what: String) -> FuzzViolation { FuzzViolation(target: self, what: what) }

    private func header(_ data: [UInt8]) throws(FuzzViolation) {
        guard let h = try? ImageHeader.decode(data) else { return }
        let again: ImageHeader
        do { again = try ImageHeader.decode(h.encode()) } catch { throw fail("a decoded header does not decode again: \(error)") }
        guard again == h else { throw fail("re-encoding changed the header: \(h) became \(again)") }
        let l = h.layout
        guard UInt64(l.firstDataOffset) >= UInt64(PloopSpec.headerSize) else { throw fail("first data offset \(l.firstDataOffset) inside the header") }
        guard h.virtualBytes == h.sizeInSectors * 512 else { throw fail("virtual size \(h.virtualBytes) is not \(h.sizeInSectors) sectors") }
    }

    private func image(_ data: [UInt8]) throws(FuzzViolation) {
        let file = MemoryBlockFile(path: "<fuzz>", bytes: data)
        var readOnly = Checker.Options()
        readOnly.readOnly = true
        readOnly.force = true
        readOnly.detailed = true
        _ = try? Checker.check(file, options: readOnly)
        guard file.contents == data else { throw fail("a read-only check wrote to the image") }

        var repair = Checker.Options()
        repair.force = true
        repair.hardForce = true
        repair.dropInUse = true
        guard let first = try? Checker.check(file, options: repair) else { return }
        let repaired = file.contents
        // Repair may complete a half-written last cluster with zeros and give each block two
        // clusters shared a copy of its own (-F), never more.
        if repaired.count > data.count {
            let cluster = (try? ImageHeader.decode(Array(repaired.prefix(PloopSpec.headerSize))))?.clusterBytes ?? 0
            let copies = first.findings.filter { if case .usedTwice = $0.problem { $0.action == .fixed } else { false } }.count
            guard cluster > 0, repaired.count <= ((data.count + cluster - 1) / cluster + copies) * cluster else {
                throw fail("repair grew the file from \(data.count) to \(repaired.count) bytes")
            }
        }
        guard let second = try? Checker.check(file, options: readOnly) else {
            throw fail("the repaired image (status \(first.status)) no longer checks")
        }
        guard file.contents == repaired else { throw fail("a read-only check wrote to the repaired image") }
        if first.status == .ok {
            let left = second.findings.filter { $0.action != .reported }
            guard second.status == .ok, left.isEmpty else {
                throw fail("repair said ok, a second check found: \(left.map(\.message)) (status \(second.status))")
            }
            try readEveryCluster(file)
        }
    }

    /// A checked image opens, and every cluster it maps reads without a trap.
    private func readEveryCluster(_ file: MemoryBlockFile) throws(FuzzViolation) {
        let image: Ploop1Image
        do { image = try Ploop1Image(file: file, writable: false) } catch { throw fail("a clean image does not open: \(error)") }
        let clusters = (image.virtualBytes + UInt64(image.clusterBytes) - 1) / UInt64(image.clusterBytes)
        guard image.allocatedCount > 0 else { return }
        var buffer = [UInt8](repeating: 0, count: image.clusterBytes)
        for c in 0..<min(clusters, 1 << 16) {
            do { _ = try buffer.withUnsafeMutableBytes { try image.read(cluster: ClusterIndex(c), into: $0) } } catch {
                throw fail("cluster \(c) of a clean image does not read: \(error)")
            }
        }
    }

    private func descriptor(_ data: [UInt8]) throws(FuzzViolation) {
        guard let d = try? DiskDescriptor.parse(Data(data), path: "<fuzz>") else { return }
        let text = d.xml()
        let again: DiskDescriptor
        do { again = try DiskDescriptor.parse(Data(text.utf8), path: "<written>") } catch {
            throw fail("what was written does not parse: \(error)\n\(text)")
        }
        guard again == d else { throw fail("writing and reading changed the descriptor:\n\(text)") }
        guard again.xml() == text else { throw fail("writing is not stable:\n\(text)") }
    }

    private func control(_ data: [UInt8]) {
        let line = Data(data)
        if case .success(let r) = Wire.decodeRequest(line) {
            // What decodes is what a client would send: encoding it again must not fail.
            _ = try? JSONEncoder().encode(Wire.Message(r))
        }
        _ = try? Wire.Launch.decode(String(decoding: data, as: UTF8.self))
    }

    private func stream(_ data: [UInt8]) throws(FuzzViolation) {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ploop-fuzz-stream-\(getpid())").path
        try? FileManager.default.removeItem(atPath: dir)
        guard (try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)) != nil else { return }
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let input = dir + "/input"
        guard FileManager.default.createFile(atPath: input, contents: Data(data)) else { return }
        let fd = open(input, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        defer { close(fd) }
        let destination = dir + "/img"
        let ok = (try? CopyReceiver(destination: destination).receive(input: fd)) != nil
        let left = Set((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).subtracting(["input"])
        if ok, left != ["img"] { throw fail("a received image left \(left.sorted())") }
        if !ok, !left.isEmpty { throw fail("a refused stream left \(left.sorted())") }
    }
}
