// Benchmarks of the engine in-process, side by side with plain file I/O on the same machine.
// Not a test: it prints figures; scripts/bench runs it and docs/PERFORMANCE.md records them.
//
//   ploop-bench io [--size-mib N] [--threads T] [--seconds S] [--dir DIR]
//   ploop-bench alloc --block-size 4k|64k --count N --image PATH [--threads T] [--plain]
//   ploop-bench reloc --mib N --image PATH
//   ploop-bench spread --image PATH
import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopSystem
import Synchronization

func arg(_ name: String, _ def: String) -> String {
    let a = CommandLine.arguments
    if let i = a.firstIndex(of: name), i + 1 < a.count { return a[i + 1] }
    return def
}

func now() -> Double { Double(Host.monotonicNanoseconds()) / 1e9 }

/// Something to read and write at byte offsets.
protocol Target: Sendable {
    func read(_ b: UnsafeMutableRawBufferPointer, _ at: UInt64) throws
    func write(_ b: UnsafeRawBufferPointer, _ at: UInt64) throws
    func flush() throws
}

struct PlainFile: Target {
    let f: File
    func read(_ b: UnsafeMutableRawBufferPointer, _ at: UInt64) throws { _ = try f.read(into: b, at: at) }
    func write(_ b: UnsafeRawBufferPointer, _ at: UInt64) throws { try f.write(b, at: at) }
    func flush() throws { try f.sync() }
}

struct Model: Target {
    let m: DeviceModel
    func read(_ b: UnsafeMutableRawBufferPointer, _ at: UInt64) throws { try m.read(into: b, at: at) }
    func write(_ b: UnsafeRawBufferPointer, _ at: UInt64) throws { try m.write(b, at: at) }
    func flush() throws { try m.flush() }
}

enum Pattern: String, CaseIterable { case seqWrite = "1M seq write", seqRead = "1M seq read", randWrite = "4k rand write", randRead = "4k rand read" }

/// Runs `threads` workers for `seconds`; returns operations per second.
func run(_ t: any Target, _ p: Pattern, size: UInt64, threads: Int, seconds: Double) throws -> Double {
    let bs = (p == .seqWrite || p == .seqRead) ? 1 << 20 : 4096
    let ops = Atomic<Int>(0)
    let stop = Atomic<Bool>(false)
    let failed = Atomic<Bool>(false)
    let group = DispatchGroup()
    for id in 0..<threads {
        group.enter()
        Thread {
            let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: bs, alignment: 4096)
            defer { buf.deallocate(); group.leave() }
            memset(buf.baseAddress!, Int32(id + 1), bs)
            var x = UInt64(id + 1) &* 0x9E37_79B9_7F4A_7C15
            let slots = size / UInt64(bs)
            var seq = UInt64(id) * slots / UInt64(threads)
            while !stop.load(ordering: .relaxed) {
                let at: UInt64
                switch p {
                case .seqWrite, .seqRead:
                    at = (seq % slots) * UInt64(bs)
                    seq += 1
                case .randWrite, .randRead:
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17
                    at = (x % slots) * UInt64(bs)
                }
                do {
                    if p == .seqWrite || p == .randWrite { try t.write(UnsafeRawBufferPointer(buf), at) } else { try t.read(buf, at) }
                } catch {
                    failed.store(true, ordering: .relaxed)
                    return
                }
                ops.add(1, ordering: .relaxed)
            }
        }.start()
    }
    let start = now()
    Thread.sleep(forTimeInterval: seconds)
    stop.store(true, ordering: .relaxed)
    group.wait()
    let elapsed = now() - start
    if failed.load(ordering: .relaxed) { throw DeviceError.invalid("I/O failed during \(p.rawValue)") }
    return Double(ops.load(ordering: .relaxed)) / elapsed
}

func io() throws {
    let sizeMiB = UInt64(arg("--size-mib", "1024"))!
    let threads = Int(arg("--threads", "4"))!
    let seconds = Double(arg("--seconds", "3"))!
    let dir = arg("--dir", "/var/tmp")
    let size = sizeMiB << 20
    let plainPath = dir + "/ploop-bench-plain.\(Host.processID)"
    let imagePath = dir + "/ploop-bench-image.\(Host.processID)"
    defer {
        PathInfo.removeRegularFile(plainPath)
        PathInfo.removeRegularFile(imagePath)
    }
    let plain = try File(path: plainPath, mode: .createNew)
    try Offline.initialize(.init(path: imagePath, sizeSectors: size / 512))
    let model = try DeviceModel(MountRequest(images: [imagePath]))
    defer { try? model.stop() }
    // Both fully written first, so the figures compare steady-state I/O, not allocation.
    let fill = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    memset(fill.baseAddress!, 0x5a, 1 << 20)
    for off in stride(from: UInt64(0), to: size, by: 1 << 20) {
        try plain.write(UnsafeRawBufferPointer(fill), at: off)
        try model.write(UnsafeRawBufferPointer(fill), at: off)
    }
    fill.deallocate()
    try plain.sync()
    try model.flush()
    print("in-process I/O, \(sizeMiB) MiB, \(threads) threads, \(seconds) s each; ratio = ploop / plain file")
    for p in Pattern.allCases {
        let a = try run(PlainFile(f: plain), p, size: size, threads: threads, seconds: seconds)
        let b = try run(Model(m: model), p, size: size, threads: threads, seconds: seconds)
        let unit = (p == .seqWrite || p == .seqRead) ? "MB/s" : "IOPS"
        let scale = (p == .seqWrite || p == .seqRead) ? 1.048576 : 1.0
        print(String(format: "%-14@ plain %10.0f %@  ploop %10.0f %@  ratio %.2f", p.rawValue as NSString, a * scale, unit as NSString, b * scale, unit as NSString, b / a))
    }
}

func alloc() throws {
    let bsText = arg("--block-size", "4k")
    let bs = Int(try SizeArgument.sectors(bsText) * 512)
    let count = Int(arg("--count", "100000"))!
    let path = arg("--image", "")
    let threads = Int(arg("--threads", "4"))!
    // --plain: the same writes into a plain (preallocated) file, the limit for buffered I/O.
    let plain = CommandLine.arguments.contains("--plain")
    let target: any Target = plain
        ? PlainFile(f: try File(path: path, mode: .readWrite))
        : Model(m: try DeviceModel(MountRequest(images: [path])))
    let next = Atomic<Int>(0)
    let group = DispatchGroup()
    for id in 0..<threads {
        group.enter()
        Thread {
            let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: bs, alignment: 4096)
            memset(buf.baseAddress!, Int32(id + 1), bs)
            defer { buf.deallocate(); group.leave() }
            while true {
                let i = next.add(1, ordering: .relaxed).oldValue
                if i >= count { break }
                try! target.write(UnsafeRawBufferPointer(buf), UInt64(i) * UInt64(bs))
            }
        }.start()
    }
    group.wait()
    try target.flush()
    if let m = target as? Model { try m.m.stop() }
}

/// Relocation as the balloon does it: an image of 2×N MiB written, the first N MiB loaded as free
/// blocks, the tail N MiB relocated into them. Prints the seconds the relocation took.
func reloc() throws {
    let mib = Int(arg("--mib", "512"))!
    let path = arg("--image", "")
    try Offline.initialize(.init(path: path, sizeSectors: UInt64(2 * mib) << 11))
    let model = try DeviceModel(MountRequest(images: [path]))
    let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    memset(buf.baseAddress!, 0x6b, 1 << 20)
    for c in 0..<(2 * mib) { try model.write(UnsafeRawBufferPointer(buf), at: UInt64(c) << 20) }
    buf.deallocate()
    try model.flush()
    let image = try Ploop1Image(file: try ImagePath.open(path, write: false), writable: false)
    let free = (0..<UInt64(mib)).map { c in FreeExtent(cluster: UInt32(c), block: image.block(of: ClusterIndex(c))!.value, length: 1) }
    _ = try model.balloon(inflate: true, keepIntact: false)
    let head = try model.loadFreeBlocks(level: 0, extents: free)
    let owners = image.owners()
    let tail = (head - UInt32(mib)..<head).map { b in RelocExtent(cluster: UInt32(owners[b]!.value), block: b, length: 1, free: false) }
    let start = now()
    let cut = try model.relocateBlocks(level: 0, allocHead: head, extents: tail)
    let t = now() - start
    try model.stop()
    print(String(format: "%.3f", t))
    FileHandle.standardError.write("relocated \(tail.count) MiB, cut \(cut) clusters\n".data(using: .utf8)!)
}

/// The worst case for the memory a BAT costs: one cluster mapped in every BAT page of an empty
/// image, each to its own block past the end, and the file extended over them without data
/// (sparse), so a 50 TiB image touches all 200 MiB of its BAT while holding no data. Prints the
/// number of clusters mapped.
func spread() throws {
    let path = arg("--image", "")
    let file = try File(path: path, mode: .readWrite)
    var head = [UInt8](repeating: 0, count: Int(PloopSpec.headerSize))
    _ = try head.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }
    let header = try ImageHeader.decode(head)
    let layout = header.layout
    let perPage = UInt64(4096 / 4)
    var block = (try file.size() + UInt64(layout.clusterBytes) - 1) / UInt64(layout.clusterBytes)
    var mapped = 0
    for cluster in stride(from: UInt64(0), to: UInt64(layout.entries), by: Int(perPage)) {
        var entry = layout.encode(ImageBlock(UInt32(block))).littleEndian
        try withUnsafeBytes(of: &entry) { try file.write($0, at: layout.entryOffset(ClusterIndex(cluster))) }
        block += 1
        mapped += 1
    }
    try file.truncate(to: block * UInt64(layout.clusterBytes))
    try file.sync()
    print(mapped)
}

do {
    switch CommandLine.arguments.dropFirst().first {
    case "spread": try spread()
    case "io": try io()
    case "alloc": try alloc()
    case "reloc": try reloc()
    default:
        print("usage: ploop-bench io [--size-mib N] [--threads T] [--seconds S] [--dir DIR] | alloc --block-size 4k --count N --image PATH")
        exit(2)
    }
} catch {
    print("ploop-bench: \(error)")
    exit(1)
}
