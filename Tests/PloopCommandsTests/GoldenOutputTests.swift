import ArgumentParser
import Foundation
@testable import PloopCommands
import PloopTestSupport
import Testing

/// Every `--help` and a set of `--json` outputs against files under fixtures/golden: a changed
/// output shows as a diff in review. `PLOOP_UPDATE_GOLDEN=1 swift test --filter GoldenOutputTests`
/// rewrites them (then read the diff before committing).
struct GoldenOutputTests {
    static let root = TestSupport.packageRoot.appendingPathComponent("fixtures/golden").path
    static let update = ProcessInfo.processInfo.environment["PLOOP_UPDATE_GOLDEN"] == "1"

    static func compare(_ text: String, _ name: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let path = root + "/" + name
        if update {
            try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            return
        }
        guard let golden = try? String(contentsOfFile: path, encoding: .utf8) else {
            Issue.record("\(name) has no golden file: run PLOOP_UPDATE_GOLDEN=1 swift test --filter GoldenOutputTests", sourceLocation: sourceLocation)
            return
        }
        if golden != text {
            let a = golden.split(separator: "\n", omittingEmptySubsequences: false)
            let b = text.split(separator: "\n", omittingEmptySubsequences: false)
            let line = (0..<max(a.count, b.count)).first { $0 >= a.count || $0 >= b.count || a[$0] != b[$0] } ?? 0
            let was = line < a.count ? String(a[line]) : "<end>"
            let now = line < b.count ? String(b[line]) : "<end>"
            Issue.record("\(name) changed at line \(line + 1):\n  golden: \(was)\n  now:    \(now)", sourceLocation: sourceLocation)
        }
    }

    /// (file name, command) for every command and balloon subcommand users see.
    static var commands: [(String, ParsableCommand.Type)] {
        var out: [(String, ParsableCommand.Type)] = []
        for c in Ploop.configuration.subcommands where c.configuration.shouldDisplay {
            let name = c._commandName
            out.append((name, c))
            for s in c.configuration.subcommands { out.append(("\(name)-\(s._commandName)", s)) }
        }
        return out
    }

    @Test func everyHelpIsAsRecorded() throws {
        try Self.compare(Ploop.helpMessage(columns: 100) + "\n", "help/ploop.txt")
        #expect(Self.commands.count >= 25, "only \(Self.commands.count) commands found")
        for (name, command) in Self.commands {
            try Self.compare(Ploop.helpMessage(for: command, columns: 100) + "\n", "help/\(name).txt")
        }
    }

    /// The JSON of offline commands on images and a disk made here; the scratch folder and the
    /// random delta names are replaced by fixed words.
    @Test func jsonOutputsAreAsRecorded() throws {
        let dir = try ScratchDirectory("ploop-golden")
        func run(_ args: String...) throws -> String {
            let r = try TestSupport.ploop(args, cwd: dir.path)
            #expect(r.code == 0, "\(args): \(r)")
            return r.stdout
                .replacingOccurrences(of: dir.path, with: "SCRATCH")
                .replacingOccurrences(of: #"\.\{[0-9a-fA-F-]{36}\}"#, with: ".{RANDOM}", options: .regularExpression)
        }
        _ = try run("init", "--no-descriptor", "-s", "64m", "-b", "128", "a.hds")
        _ = try run("init", "--no-descriptor", "-s", "64m", "-b", "128", "b.hds")
        try Self.compare(try run("info", "--json", "a.hds"), "json/info-image.json")
        try Self.compare(try run("check", "-f", "--json", "a.hds"), "json/check-image.json")
        try Self.compare(try run("merge", "--json", "a.hds", "b.hds"), "json/merge-offline.json")
        try FileManager.default.createDirectory(atPath: dir.file("disk"), withIntermediateDirectories: false)
        _ = try run("init", "-s", "64m", "-b", "128", "disk/root.hds")
        _ = try run("snapshot", "-u", "{11111111-1111-4111-8111-111111111111}", "disk")
        try Self.compare(try run("snapshot-list", "--json", "disk"), "json/snapshot-list.json")
        try Self.compare(try run("info", "-s", "--json", "disk"), "json/info-disk.json")
    }
}
