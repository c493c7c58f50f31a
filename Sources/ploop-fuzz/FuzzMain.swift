// The fuzz targets of PloopFuzz as a program. Built normally it replays inputs (a corpus, a
// crash libFuzzer saved) and writes seed corpora; built by scripts/fuzz with
// `-sanitize=fuzzer -DPLOOP_LIBFUZZER` it is a libFuzzer binary, coverage-guided.
//
//   ploop-fuzz TARGET FILE|DIR ...       replay: every input through TARGET (exit 1 on a violation)
//   ploop-fuzz seeds TARGET DIR          write TARGET's seed inputs into DIR
//   ploop-fuzz TARGET [libFuzzer options] [CORPUS ...]   (libFuzzer build)
//
// TARGET: header, image, descriptor, control, stream.
import Foundation
import PloopFuzz

func usage() -> Never {
    let names = FuzzTarget.allCases.map(\.rawValue).joined(separator: ", ")
    FileHandle.standardError.write(Data("usage: ploop-fuzz TARGET FILE|DIR ... | ploop-fuzz seeds TARGET DIR   (TARGET: \(names))\n".utf8))
    exit(2)
}

func target(_ name: String) -> FuzzTarget {
    guard let t = FuzzTarget(rawValue: name) else {
        FileHandle.standardError.write(Data("ploop-fuzz: no target '\(name)'\n".utf8))
        usage()
    }
    return t
}

/// Every regular file under the paths, in a stable order.
func inputs(_ paths: [String]) -> [String] {
    var out: [String] = []
    for p in paths {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: p, isDirectory: &isDir) else { continue }
        if !isDir.boolValue { out.append(p); continue }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: p)) ?? []
        out += names.sorted().map { p + "/" + $0 }.filter { !$0.hasSuffix("/.") }
    }
    return out
}

/// The resident set, from /proc/self/statm (pages of 4 KiB).
func residentKiB() -> Int {
    guard let s = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
    let fields = s.split(separator: " ")
    return fields.count > 1 ? (Int(fields[1]) ?? 0) * 4 : 0
}

#if PLOOP_LIBFUZZER
nonisolated(unsafe) var selected = FuzzTarget.header

@_cdecl("LLVMFuzzerTestOneInput")
public func testOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? []
    do { try selected.run(bytes) } catch { fatalError("\(error)") }
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
func runDriver(
    _ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt
#endif

@main enum FuzzMain {
    static func main() {
        var args = Array(CommandLine.arguments.dropFirst())
        guard let first = args.first else { usage() }
        if first == "seeds" {
            guard args.count == 3 else { usage() }
            let t = target(args[1])
            try? FileManager.default.createDirectory(atPath: args[2], withIntermediateDirectories: true)
            for seed in t.seeds() {
                _ = FileManager.default.createFile(atPath: args[2] + "/seed-" + seed.name, contents: Data(seed.bytes))
            }
            print("\(t.rawValue): \(t.seeds().count) seeds in \(args[2])")
            return
        }
        let t = target(first)
        args.removeFirst()
        #if PLOOP_LIBFUZZER
        selected = t
        // libFuzzer sees the program name and its own options, not the target.
        var argv: [UnsafeMutablePointer<CChar>?] = ([CommandLine.arguments[0]] + args).map { strdup($0) } + [nil]
        var argc = CInt(args.count + 1)
        argv.withUnsafeMutableBufferPointer { buffer in
            var base = buffer.baseAddress!
            exit(runDriver(&argc, &base, testOneInput))
        }
        #else
        let files = inputs(args)
        // PLOOP_FUZZ_REPEAT=N runs each input N times and reports the growth of the resident
        // set per run: a leak libFuzzer would only see as a slow out-of-memory.
        let repeats = Int(ProcessInfo.processInfo.environment["PLOOP_FUZZ_REPEAT"] ?? "") ?? 1
        var violations = 0
        for f in files {
            guard let data = FileManager.default.contents(atPath: f) else { continue }
            let before = residentKiB()
            for _ in 0..<max(repeats, 1) {
                do { try t.run(Array(data)) } catch {
                    violations += 1
                    print("\(f): \(error)")
                    break
                }
            }
            if repeats > 1 { print("\(f): \(String(format: "%.3f", Double(residentKiB() - before) / Double(repeats))) KiB resident per run") }
        }
        print("\(t.rawValue): \(files.count) inputs, \(violations) violations")
        exit(violations == 0 ? 0 : 1)
        #endif
    }
}
