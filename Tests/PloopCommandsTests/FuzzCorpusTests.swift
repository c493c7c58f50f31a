import Foundation
import PloopDisk
import PloopFuzz
import PloopTestSupport
import Testing

/// The fuzz targets over their seeds and over every input fuzzing has found (fixtures/fuzz/
/// TARGET/): a crash found once stays a test. scripts/fuzz runs the targets under libFuzzer.
@Suite struct FuzzCorpusTests {
    static let corpus = TestSupport.packageRoot.appendingPathComponent("fixtures/fuzz").path

    static func found(_ t: FuzzTarget) -> [(String, [UInt8])] {
        let dir = corpus + "/" + t.rawValue
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
        return names.compactMap { n in FileManager.default.contents(atPath: dir + "/" + n).map { (n, Array($0)) } }
    }

    @Test(arguments: FuzzTarget.allCases)
    func seedsAndFoundInputsKeepTheInvariants(_ t: FuzzTarget) {
        let inputs = t.seeds() + Self.found(t)
        if t != .descriptor { #expect(!t.seeds().isEmpty, "\(t) has no seeds") }
        for (name, bytes) in inputs {
            do { try t.run(bytes) } catch { Issue.record("\(name): \(error)") }
        }
    }

    /// Foundation's XMLParser traps on both (the whole `ploop` process died on a descriptor with
    /// one flipped byte); they are refused with where the damage is.
    @Test(arguments: [
        ("invalid-utf8-element-name", "it is not UTF-8 text (an invalid sequence at byte 42)"),
        ("empty-processing-instruction", "it holds a processing instruction (<?…?>) at byte 0"),
    ])
    func descriptorsThatCrashedXMLParserAreRefused(_ name: String, _ message: String) throws {
        let data = try #require(FileManager.default.contents(atPath: Self.corpus + "/descriptor/" + name))
        #expect(throws: DiskError.self) { try DiskDescriptor.parse(data, path: "DD.xml") }
        do { _ = try DiskDescriptor.parse(data, path: "DD.xml") } catch {
            #expect("\(error)".contains(message), "\(error)")
        }
    }

    /// The command refuses the damaged descriptor and changes nothing in the folder.
    @Test func aDamagedDescriptorIsAnErrorNotACrash() throws {
        let dir = try ScratchDirectory("ploop-fuzzdd")
        let data = try #require(FileManager.default.contents(atPath: Self.corpus + "/descriptor/invalid-utf8-element-name"))
        try data.write(to: URL(fileURLWithPath: dir.file("DiskDescriptor.xml")))
        let before = try ScratchDirectoryState(dir.path)
        let r = try TestSupport.run(TestSupport.ploopBinary, ["snapshot-list", dir.path])
        #expect(r.code == 39 && r.stderr.contains("not UTF-8"), "\(r)")
        #expect(try ScratchDirectoryState(dir.path) == before)
    }
}
