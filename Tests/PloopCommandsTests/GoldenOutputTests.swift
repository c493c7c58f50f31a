import ArgumentParser
import Foundation
@testable import PloopCommands
import PloopTestSupport
import Testing

/// Every `--help` and a set of `--json` outputs against files under fixtures/golden (`Golden`):
/// `PLOOP_UPDATE_GOLDEN=1 swift test --filter GoldenOutputTests` rewrites them (then read the
/// diff before committing).
struct GoldenOutputTests {
    static func compare(_ text: String, _ name: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        try Golden.compare(text, name, sourceLocation: sourceLocation)
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

    /// `--version` (the commit replaced by a word), the shape of `version --json` (its values are
    /// the host's), the completion scripts, and the man page's command list: the man page is
    /// rendered (scripts/install, swift-argument-parser's generate-manual) from
    /// `--experimental-dump-help`, so its commands are the ones that document lists.
    @Test func versionCompletionsAndManualAreAsRecorded() throws {
        let version = try TestSupport.ploop("--version")
        #expect(version.code == 0)
        try Self.compare(version.stdout.replacingOccurrences(of: #"\(git [0-9a-f]{12}(\+changes)?\)"#, with: "(git COMMIT)", options: .regularExpression), "version.txt")
        let report = try TestSupport.ploop("version", "--json")
        #expect(report.code == 0, "\(report)")
        // Keys present only on some hosts (why a backend is unavailable; the commit outside git) are
        // recorded whether or not this host prints them.
        try Golden.compareShape(report.stdout, "json/version.shape.txt", optional: [".backends[].why: string", ".commit: string"])
        for shell in CompletionShell.allCases {
            try Self.compare(Ploop.completionScript(for: shell), "completions/ploop.\(shell.rawValue)")
        }
        let dump = try TestSupport.ploop("--experimental-dump-help")
        let root = try JSONSerialization.jsonObject(with: Data(dump.stdout.utf8)) as? [String: Any]
        var lines: [String] = []
        func walk(_ c: [String: Any], _ path: [String]) {
            for sub in c["subcommands"] as? [[String: Any]] ?? [] where sub["shouldDisplay"] as? Bool ?? true {
                let name = path + [sub["commandName"] as? String ?? "?"]
                lines.append(name.joined(separator: " ") + " — " + (sub["abstract"] as? String ?? ""))
                walk(sub, name)
            }
        }
        walk(root?["command"] as? [String: Any] ?? [:], ["ploop"])
        #expect(lines.count >= 25, "\(lines)")
        try Self.compare(lines.joined(separator: "\n") + "\n", "manual-commands.txt")
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
        try Self.compare(try run("grow", "--json", "-s", "128m", "b.hds"), "json/grow-offline.json")
        // The receiving end of a copy, from a stream of one record and the end record.
        _ = FileManager.default.createFile(atPath: dir.file("stream"), contents: Data(CopyStreamBytes.valid()))
        let received = try TestSupport.ploopLimited(["copy", "-d", "copied.hds", "--json"], cwd: dir.path, input: dir.file("stream"))
        #expect(received.code == 0, "\(received)")
        try Self.compare(received.stdout, "json/copy-receiver.json")
        try FileManager.default.createDirectory(atPath: dir.file("disk"), withIntermediateDirectories: false)
        _ = try run("init", "-s", "64m", "-b", "128", "disk/root.hds")
        _ = try run("snapshot", "-u", "{11111111-1111-4111-8111-111111111111}", "disk")
        try Self.compare(try run("snapshot-list", "--json", "disk"), "json/snapshot-list.json")
        try Self.compare(try run("info", "-s", "--json", "disk"), "json/info-disk.json")
        try Self.compare(try run("check", "-f", "--json", "disk"), "json/check-disk.json")
    }
}

/// `--json` progress: one JSON event per line on stderr (terminal or not), the document alone on
/// stdout, the same files as without it.
struct JSONProgressTests {
    struct NotAnEvent: Error { var line: String }

    static func events(_ stderr: String) throws -> [[String: Any]] {
        try stderr.split(separator: "\n").map { line in
            guard let e = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                throw NotAnEvent(line: String(line))
            }
            return e
        }
    }

    @Test func mergeAndGrowReportProgressAsEvents() throws {
        let dir = try ScratchDirectory("ploop-progress")
        let clusters = Array(UInt64(0)..<200)
        let a = try Images.make(dir, "a.hdd", size: "64m", clusters: clusters)
        let b = try Images.make(dir, "b.hdd", size: "64m")
        let merge = try TestSupport.ploop("merge", "--json", a, b)
        #expect(merge.code == 0, "\(merge)")
        let doc = try JSONSerialization.jsonObject(with: Data(merge.stdout.utf8)) as? [String: Any]
        #expect(doc?["clustersCopied"] as? Int == clusters.count, "\(merge.stdout)")
        let events = try Self.events(merge.stderr)
        #expect(!events.isEmpty, "no progress events: \(merge)")
        let percents = events.compactMap { $0["percent"] as? Int }
        #expect(percents.count == events.count && percents == percents.sorted() && percents.last == 100, "\(percents)")
        for e in events {
            #expect(e["event"] as? String == "progress" && e["step"] as? String == "merging", "\(e)")
            #expect((e["total"] as? Int ?? 0) > 0 && (e["done"] as? Int ?? -1) <= (e["total"] as? Int ?? 0), "\(e)")
        }
        // The same merge without --json prints no event (stderr is not a terminal here).
        let c = try Images.make(dir, "c.hdd", size: "64m")
        let plain = try TestSupport.ploop("merge", a, c)
        #expect(plain.code == 0 && plain.stderr.isEmpty, "\(plain)")
        #expect(dir.read("b.hdd") == dir.read("c.hdd"), "--json changed what merge wrote")
        // grow past what the BAT maps: data clusters move, and say so; the size is in the document.
        let grow = try TestSupport.ploop("grow", "--json", "-s", "64g", b)
        #expect(grow.code == 0, "\(grow)")
        let grown = try JSONSerialization.jsonObject(with: Data(grow.stdout.utf8)) as? [String: Any]
        #expect(grown?["sizeBytes"] as? Int == 64 << 30 && grown?["sizeSectors"] as? Int == 64 << 21 && grown?["target"] as? String == b, "\(grow.stdout)")
        let moved = try Self.events(grow.stderr)
        #expect(moved.last?["percent"] as? Int == 100 && moved.allSatisfy { $0["step"] as? String == "relocating" }, "\(grow)")
        #expect(try TestSupport.ploop("check", "-f", b).code == 0)
        // check: the BAT scan, then the scan of the used clusters for holes, each to 100%.
        let check = try TestSupport.ploop("check", "-f", "--json", a)
        #expect(check.code == 0, "\(check)")
        let checked = try Self.events(check.stderr)
        let steps = checked.compactMap { $0["step"] as? String }
        #expect(steps.first == "checking the BAT" && steps.last == "checking for holes", "\(check)")
        for step in ["checking the BAT", "checking for holes"] {
            #expect(checked.last { $0["step"] as? String == step }?["percent"] as? Int == 100, "\(step): \(check)")
        }
        #expect((try JSONSerialization.jsonObject(with: Data(check.stdout.utf8)) as? [String: Any])?["status"] as? String == "ok", "\(check.stdout)")
    }
}
