import Foundation
import PloopImage
import PloopSystem
import PloopTestSupport
import Testing

/// Every descriptor command through a power cut at any point (FolderLog): each folder it can
/// leave reads as the old disk or the new one, the command run again completes it, and then
/// the disk checks clean and holds no leftovers (DiskCrashTests' rules for kills).
/// `PLOOP_CRASH_STATES_SUBSETS` (default 2) sets the random subsets per cut; scripts/crash-states
/// runs more.
struct FolderPowerCutTests {
    static let subsets = CrashStates.subsets(2)

    @Test(arguments: DiskCrashTests.commands)
    func everyPowerCutStateIsOldOrNewAndFinishes(_ command: [String]) throws {
        try Self.cut(command)
    }

    /// `convert -v 2` of a disk whose images are version 1 (staged, then `convert -v 1`).
    @Test func everyPowerCutStateOfAConversionToVersion2IsOldOrNewAndFinishes() throws {
        try Self.cut(["convert", "-v", "2"]) { staged in
            let r = InProcess.ploop("convert", "-v", "1", staged + "/DiskDescriptor.xml")
            #expect(r.code == 0, "\(r)")
        }
    }

    static func cut(_ command: [String], prepare: (String) throws -> Void = { _ in }) throws {
        let root = try ScratchDirectory("ploop-powercut")
        let staged = try DiskCrashTests.stage(root)
        try prepare(staged)
        let old = try DiskCrashTests.content(staged)
        let args = { (disk: String) in command.map { $0.replacingOccurrences(of: "@", with: disk) } + [disk + "/DiskDescriptor.xml"] }
        let initial = try FolderLog.snapshot(staged)
        // The recorded run is the reference: the new disk, and the files it leaves. The states
        // are then made where it ran (a journal names files by their full paths).
        let disk = root.file("run")
        try DiskCrashTests.copy(staged, to: disk)
        let logPath = root.file("changes.log")
        let r = try TestSupport.run(TestSupport.ploopBinary, args(disk), environment: [ChangeRecorder.variable: logPath])
        #expect(r.code == 0, "\(r)")
        let new = try DiskCrashTests.content(disk)
        let referenceFiles = try DiskCrashTests.files(disk)
        let log = FolderLog(Array(try Data(contentsOf: URL(fileURLWithPath: logPath))), folder: URL(fileURLWithPath: disk).standardizedFileURL.path)
        #expect(log.entries.count > 3, "the recorder saw \(log.entries.count) changes")
        let states = log.states(initial: initial, randomSubsets: Self.subsets, cutsPerRun: 4 + 2 * Self.subsets)
        let final = FolderLog.digest(try FolderLog.snapshot(disk))
        for s in states {
            // The whole run: nothing to finish (a re-run would be a second snapshot, say).
            if FolderLog.digest(s.files) == final { continue }
            try FolderLog.materialize(s.files, at: disk)
            try DiskCrashTests.expectOldOrNewThenFinished(
                disk, old: old, new: new, command: command, arguments: args(disk), referenceFiles: referenceFiles, after: "a power cut (\(s.name))")
        }
        print("power-cut states: \(command.joined(separator: " ")): \(states.count) from \(log.entries.count) changes")
    }
}

/// `convert -f` between layouts through a power cut at any point: the disk is the old layout or
/// the new one with the same data, checks, and a re-run converts it; nothing is left over.
struct LayoutPowerCutTests {
    @Test(arguments: DiskLayoutTests.conversions)
    func everyPowerCutStateIsOneLayoutOrTheOther(_ from: String, _ to: String) throws {
        let root = try ScratchDirectory("ploop-layoutcut")
        let staged = try DiskLayoutTests.stage(root, from)
        let initial = try FolderLog.snapshot(staged)
        let disk = root.file("run")
        try DiskCrashTests.copy(staged, to: disk)
        let logPath = root.file("changes.log")
        let r = try TestSupport.run(TestSupport.ploopBinary, ["convert", "-f", to, disk], environment: [ChangeRecorder.variable: logPath])
        #expect(r.code == 0, "\(r)")
        let final = FolderLog.digest(try FolderLog.snapshot(disk))
        let names = try FileManager.default.contentsOfDirectory(atPath: disk).sorted()
        let log = FolderLog(Array(try Data(contentsOf: URL(fileURLWithPath: logPath))), folder: URL(fileURLWithPath: disk).standardizedFileURL.path)
        let states = log.states(initial: initial, randomSubsets: CrashStates.subsets(2), cutsPerRun: 2 + CrashStates.subsets(2))
        for s in states where FolderLog.digest(s.files) != final {
            try FolderLog.materialize(s.files, at: disk)
            try DiskLayoutTests.expectOneLayoutThenConverted(disk, from: from, to: to, names: names, after: "\(from) → \(to), a power cut (\(s.name))")
        }
        print("power-cut states: convert -f \(from) to \(to): \(states.count) from \(log.entries.count) changes")
    }
}
