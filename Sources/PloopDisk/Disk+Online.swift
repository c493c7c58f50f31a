import Foundation
import PloopDevice
import PloopImage
import PloopSystem

/// Operations on a disk a device runs, and recovering them. The journal of an online operation
/// names its device; the next open asks that device what it runs now:
///
/// * the new chain: the operation reached the device, the descriptor is committed;
/// * the old chain, the device idle: a snapshot never reached it (rolled back: its new delta is
///   removed), a merge is run again on the device (merges are idempotent) and committed;
/// * the old chain, the device still busy: refused until it is done;
/// * no device (it stopped): a merge is finished offline as an offline merge is; a snapshot's new
///   delta is kept (the descriptor committed) if it holds data, since only the device writes it.
extension Disk {
    /// The files a device runs, base first, and its maintenance state; nil when it does not run,
    /// or runs nothing of this disk.
    func stack(of device: String, touching files: [String]) -> (paths: [String], state: MaintenanceState, sectors: UInt64)? {
        guard let be = backend, let info = try? be.info(device), info.running else { return nil }
        let paths = info.levels.map(\.path)
        let ours = Set(files.compactMap(PathInfo.identity))
        return paths.contains { PathInfo.identity($0).map(ours.contains) ?? false } ? (paths, info.state, info.sizeBytes / 512) : nil
    }

    /// The files of a descriptor's running chain, base first.
    func chainFiles(_ d: DiskDescriptor) -> [String] { d.chain().reversed().map { resolve(d.image($0)!.file) } }

    static func sameFiles(_ a: [String], _ b: [String]) -> Bool {
        a.count == b.count && zip(a, b).allSatisfy { x, y in PathInfo.identity(x).map { $0 == PathInfo.identity(y) } ?? false }
    }

    /// Recovers an online operation (see the type's comment). False: its device stopped and the
    /// offline recovery applies.
    func recoverOnline(_ j: Journal, device: String, next: DiskDescriptor) throws(DiskError) -> Bool {
        guard backend != nil else {
            throw .refused("\(descriptorPath): an online \(j.operation) on \(device) was interrupted, and no device backend is available here to ask what \(device) runs: run the command again where it is (as root)")
        }
        let old = chainFiles(descriptor)
        let new = chainFiles(next)
        let stack = stack(of: device, touching: old + new)
        // A grow keeps the files: what tells is the device's size. Gone, the offline recovery
        // grows the images.
        if let size = j.grow {
            guard let stack else { return false }
            if stack.sectors >= size {
                say("finishing an interrupted \(j.operation): \(device) has the new size")
                try commit(next)
                finishedOperation = j.operation
            } else {
                say("rolled back an interrupted \(j.operation) (\(device) did not grow)")
            }
            return true
        }
        if let stack, Self.sameFiles(stack.paths, new) {
            say("finishing an interrupted \(j.operation): \(device) runs the new chain")
            try commit(next)
            finishedOperation = j.operation
            return true
        }
        if let stack, j.merge != nil, old.count >= 2, Self.sameFiles(stack.paths, old.dropLast(2) + [old[old.count - 1], old[old.count - 2]]) {
            // dm-ploop's reverse merge stopped after its flip: the file below the old top already
            // serves as the top, so only the copy up remains (never a merge back down, which would
            // put the old top's clusters over what was written since).
            say("finishing an interrupted \(j.operation): \(device) runs the old chain with its two upper files swapped (a reverse merge past its flip): merging the old top up")
            do throws(DeviceError) { _ = try backend!.finishSwappedMerge(device) } catch { throw .device(device, error) }
            try commit(next)
            finishedOperation = j.operation
            return true
        }
        if let stack {
            guard Self.sameFiles(stack.paths, old) else {
                throw .refused("\(device) runs neither the old nor the new chain of \(descriptorPath) after an interrupted \(j.operation): unmount it, then run the command again")
            }
            if stack.state != .off {
                throw .refused("\(device) is still busy (\(stack.state)) with the interrupted \(j.operation): run the command again when it is done")
            }
            guard let m = j.merge else {
                say("rolled back an interrupted \(j.operation) (it never reached \(device))")
                return true
            }
            say("finishing an interrupted \(j.operation): merging again on \(device)")
            try onlineMerge(device: device, sources: m.sources, destination: m.destination, progress: nil)
            try commit(next)
            finishedOperation = j.operation
            return true
        }
        if j.merge != nil { return false }
        // A snapshot whose device stopped: its new delta was the device's top if it holds data.
        if let f = j.files.first, let info = try? ImageInfo.read(path: f), (info.allocatedClusters ?? 0) > 0 {
            say("finishing an interrupted \(j.operation): its new delta \(f) holds data the device wrote")
            try commit(next)
            finishedOperation = j.operation
        } else {
            say("rolled back an interrupted \(j.operation)")
        }
        return true
    }

    /// Merges, on `device`, the levels from `destination` up to `sources[0]` (the topmost) into
    /// `destination`.
    func onlineMerge(device: String, sources: [String], destination: String, progress: (@Sendable (Int, Int) -> Void)?) throws(DiskError) {
        guard let be = backend, let stack = stack(of: device, touching: [destination]) else {
            // The device stopped or its daemon died under the merge: 40, as for a disk that
            // does not run (the journal's recovery then finishes the merge offline).
            throw .device(device, .notRunning("\(device) (it no longer runs \(destination))"))
        }
        let ids = stack.paths.map(PathInfo.identity)
        guard let top = sources.first, let lo = ids.firstIndex(of: PathInfo.identity(destination)), let hi = ids.firstIndex(of: PathInfo.identity(top)), lo < hi else {
            throw .refused("\(device) does not run \(sources.first ?? "?") above \(destination)")
        }
        do throws(DeviceError) { _ = try be.merge(device, levels: lo...hi, progress: progress) } catch { throw .device(device, error) }
    }
}

extension Disk {
    /// Temporary snapshots (`tsnapshot`) that nothing holds any more are merged back, as the
    /// original does before each new snapshot and after a delete: each is deleted (its child's
    /// data merged into its file, on `device` when the disk runs). `held` says whether a device
    /// of its own still runs a snapshot (its read-only mount). Returns the GUIDs merged.
    @discardableResult
    public func mergeTemporarySnapshots(device: String?, held: (GUID) -> Bool, progress: (@Sendable (Int, Int) -> Void)? = nil) throws(DiskError) -> [GUID] {
        var merged: [GUID] = []
        while let g = descriptor.shots.first(where: { s in
            s.temporary && !held(s.guid) && (device == nil || descriptor.chain().contains(s.guid)) && descriptor.children(of: s.guid).count == 1
        })?.guid {
            say("merging back the temporary snapshot \(g), which nothing holds any more")
            _ = try deleteSnapshot(g, device: device, progress: progress)
            merged.append(g)
        }
        return merged
    }
}
