import Foundation
import PloopDevice
import PloopFormat
import PloopImage
import PloopSystem

extension Disk {
    // MARK: - init and restore-descriptor

    /// `ploop init` on a disk: the image, then DiskDescriptor.xml beside it (refused, touching
    /// nothing, when the folder has one already).
    @discardableResult
    public static func initialize(_ request: Offline.InitRequest, say: (String) -> Void = { _ in }) throws(DiskError) -> (DiskDescriptor, String) {
        let image = absolutePath(request.path)
        let dd = (image as NSString).deletingLastPathComponent + "/" + descriptorName
        if PathInfo.entryKind(dd) != .missing { throw .alreadyExists(dd) }
        let header: ImageHeader
        if let adopted = try interruptedInit(request, image: image) {
            // The image is published before its descriptor: killed in between, init left exactly
            // this empty image. Running init again stores the descriptor it did not get to write.
            say("\(request.path) is the empty image of an interrupted init: storing its descriptor")
            header = adopted
        } else {
            header = try imageErrors { () throws(ImageError) in try Offline.initialize(request) }
        }
        let d = DiskDescriptor.single(
            file: (image as NSString).lastPathComponent, kind: request.format == .raw ? .plain : .compressed,
            sizeSectors: header.sizeInSectors, blocksize: header.clusterSectors, cylinders: header.cylinders, heads: header.heads,
            preallocated: request.preallocated)
        do { try write(d, to: dd, replace: false) } catch {
            PathInfo.removeRegularFile(image)
            throw error
        }
        return (d, dd)
    }

    /// The header `request` would write, when `image` is exactly what such an init leaves before
    /// its descriptor: a ploop1 image of that geometry, clean and empty, or (`-f preallocated`)
    /// clean with every cluster given its block and nothing beyond (nothing to lose by adopting it).
    static func interruptedInit(_ request: Offline.InitRequest, image: String) throws(DiskError) -> ImageHeader? {
        guard request.format == .ploop1, PathInfo.entryKind(image) == .regular,
            let info = try? ImageInfo.read(path: image), info.format == .ploop1, !info.inUse
        else { return nil }
        let want: ImageHeader
        do { want = try ImageHeader.new(sizeSectors: request.sizeSectors, clusterSectors: request.clusterSectors, version: request.version) } catch {
            return nil
        }
        let blocks = request.preallocated ? Int(want.batEntries) : 0
        guard info.version == want.version.rawValue, info.virtualSize == want.virtualBytes, info.clusterSize == want.clusterBytes,
            info.allocatedClusters == blocks, info.fileSize == want.layout.firstDataOffset + UInt64(blocks) * UInt64(want.clusterBytes)
        else { return nil }
        return want
    }

    /// `ploop restore-descriptor [-f FORMAT] [-b BLOCKSIZE] DIR IMAGE`: the descriptor `init`
    /// would have written for IMAGE, in DIR (refused when DIR has one).
    public static func restoreDescriptor(folder: String, image: String, format: ImageFormat?, blocksize: UInt32?) throws(DiskError) -> String {
        let dir = absolutePath(folder)
        guard PathInfo.kind(dir) == .directory else { throw .refused("\(dir) is not a folder") }
        let dd = dir + "/" + descriptorName
        if PathInfo.entryKind(dd) != .missing { throw .alreadyExists(dd) }
        let img = absolutePath(image)
        let info = try imageErrors { () throws(ImageError) in try ImageInfo.read(path: img) }
        let kind: DiskDescriptor.Image.Kind
        let size: UInt64
        let bs: UInt32
        let chs: (UInt32, UInt32)
        switch (format ?? info.format, info.format) {
        case (.ploop1, .ploop1):
            kind = .compressed
            size = info.virtualSize / 512
            bs = UInt32(info.clusterSize! / 512)
            if let b = blocksize, b != bs { throw .refused("\(img) has clusters of \(bs) sectors, not \(b)") }
            chs = (info.cylinders ?? 0, info.heads ?? 0)
        case (.raw, .raw):
            kind = .plain
            size = info.virtualSize / 512
            bs = blocksize ?? PloopSpec.defaultClusterSectors
            guard BATLayout.isValidClusterSize(bs) else { throw .refused("-b \(bs): the cluster size is a power of two from 64 to 131072 sectors") }
            let g = CHSGeometry(sectors: size)
            chs = (g.cylinders, g.heads)
        case (.raw, .ploop1): throw .image(.looksLikePloop1(img))
        case (.ploop1, .raw): throw .image(.notPloop1(img))
        }
        let lock = try takeLock(dd, timeout: nil)
        defer { lock.unlock() }
        let d = DiskDescriptor.single(file: relative(img, to: dir), kind: kind, sizeSectors: size, blocksize: bs, cylinders: chs.0, heads: chs.1)
        try write(d, to: dd, replace: false)
        return dd
    }

    // MARK: - snapshot

    /// The file a new delta gets: `<base file>.{guid}` beside the base image, as the original.
    func newDeltaPath() -> String {
        path(of: descriptor.base!) + "." + GUID.random().text
    }

    /// The descriptor after a snapshot named `g` whose new top delta is `file`.
    func afterSnapshot(_ g: GUID, file: String, temporary: Bool = false) -> DiskDescriptor {
        var d = descriptor
        let top = d.topGUID
        d.rename(top, to: g)
        if temporary, let i = d.shots.firstIndex(where: { $0.guid == g }) { d.shots[i].temporary = true }
        d.images.append(.init(guid: top, kind: .compressed, file: relative(file)))
        d.shots.append(.init(guid: top, parent: g))
        d.topGUID = top
        return d
    }

    /// Checks a GUID asked for a new snapshot.
    func checkNewGUID(_ g: GUID) throws(DiskError) {
        if g.isNone || g == .top { throw .refused("\(g) cannot name a snapshot: it is reserved") }
        if descriptor.shot(g) != nil { throw .guidExists(descriptorPath, g) }
    }

    /// `ploop snapshot [-u G] DD` offline: a new empty top delta; the old top becomes snapshot G.
    /// `create` makes the delta file (offline: an empty image like the top; online: the
    /// backend's snapshot); it is journalled so a crash before the descriptor is written leaves
    /// no stray file.
    public func snapshot(_ guid: GUID?, temporary: Bool = false, device: String? = nil, create: ((String) throws(DiskError) -> Void)? = nil) throws(DiskError) -> (GUID, String) {
        let g = guid ?? GUID.random()
        try checkNewGUID(g)
        if descriptor.images.count >= 128 { throw .refused("\(descriptorPath) has 128 images, the most a disk can have: merge or delete snapshots first") }
        let file = newDeltaPath()
        let next = afterSnapshot(g, file: file, temporary: temporary)
        let j = Journal(operation: "snapshot \(g.key)", files: [file], device: device, descriptor: next.xml())
        try journalled(j) { step throws(DiskError) in
            step("creating the delta \(file)")
            if let create { try create(file) } else { try createEmptyDelta(file, like: descriptor.topGUID) }
            step("writing the descriptor")
            try commit(next)
        }
        return (g, file)
    }

    /// An empty ploop1 delta of the disk's size and cluster size, of `like`'s version (v2 when
    /// `like` is raw).
    func createEmptyDelta(_ file: String, like g: GUID) throws(DiskError) {
        let version: FormatVersion
        if descriptor.image(g)?.kind == .compressed, let v = (try? ImageInfo.read(path: path(of: g)))?.version, let fv = FormatVersion(rawValue: v) {
            version = fv
        } else {
            version = DefaultVersion.detect()
        }
        _ = try imageErrors { () throws(ImageError) in
            try Offline.initialize(.init(path: file, sizeSectors: descriptor.diskSizeSectors, format: .ploop1, clusterSectors: descriptor.blocksize, version: version))
        }
    }

    // MARK: - merge, delete, switch

    /// Merges `upper` into `lower`'s file (an offline merge), after which `upper`'s image names
    /// `lower`'s file and `lower` (with the images between them, when `through`) leaves the
    /// descriptor: the original's rule for snapshot-delete and snapshot-merge. With `into`, the
    /// result goes to a new file instead and both old files go.
    /// `named` is the GUID as the user typed it: the original writes that text for the entry that
    /// survives.
    /// With `device` (the device that runs the disk), the merge runs on the device (online), which
    /// drops the merged levels from its stack; `into` is then refused.
    func mergeDown(upper: GUID, lower: GUID, operation: String, into newFile: String? = nil, named: GUID? = nil, device: String? = nil, progress: (@Sendable (Int, Int) -> Void)? = nil) throws(DiskError) {
        if let device, newFile != nil {
            throw .refused("-n (merging into a new file) works offline only, and the disk runs on \(device): unmount it first, or merge without -n")
        }
        let chain = descriptor.chain(from: upper)
        guard let lowerAt = chain.firstIndex(of: lower), lowerAt > 0 else { throw .refused("\(lower) is not below \(upper)") }
        let merged = Array(chain[0..<lowerAt])  // upper first
        // A snapshot with another child would lose its parent's data.
        for g in chain[1...lowerAt] where descriptor.children(of: g).count > 1 {
            throw .refused("snapshot \(g) has \(descriptor.children(of: g).count) children (a branch): delete the other branch first")
        }
        var next = descriptor
        let lowerImage = descriptor.image(lower)!
        let target = newFile.map { Self.absolutePath($0) } ?? path(of: lower)
        if let i = next.images.firstIndex(where: { $0.guid == upper }) {
            next.images[i].file = newFile.map { relative(Self.absolutePath($0)) } ?? lowerImage.file
            next.images[i].kind = newFile == nil ? lowerImage.kind : .compressed
        }
        let lowerParent = descriptor.shot(lower)!.parent
        for g in chain[1...lowerAt] { next.remove(g) }
        if let i = next.shots.firstIndex(where: { $0.guid == upper }) { next.shots[i].parent = lowerParent }
        if let named, named == upper {
            for i in next.images.indices where next.images[i].guid == upper { next.images[i].guid = named }
            for i in next.shots.indices where next.shots[i].guid == upper { next.shots[i].guid = named }
            if next.topGUID == upper { next.topGUID = named }
        }
        var sources = merged.map { path(of: $0) }
        var files = sources
        var raw = lowerImage.kind == .plain
        if let newFile {
            let abs = Self.absolutePath(newFile)
            if PathInfo.entryKind(abs) != .missing { throw .image(.alreadyExists(abs)) }
            sources.append(path(of: lower))
            files.append(path(of: lower))
            files.append(abs)
            raw = false
        }
        let j = Journal(operation: operation, files: files, merge: .init(sources: sources, destination: target, raw: raw), device: device, descriptor: next.xml())
        let names = sources.map { ($0 as NSString).lastPathComponent }.joined(separator: ", ")
        try journalled(j) { step throws(DiskError) in
            if let device {
                step("merging \(names) into \((target as NSString).lastPathComponent) on \(device)")
                do throws(DiskError) { try onlineMerge(device: device, sources: sources, destination: target, progress: progress) } catch {
                    // Refused by the device with its stack unchanged: nothing to finish later.
                    if let stack = stack(of: device, touching: [target]), Self.sameFiles(stack.paths, chainFiles(descriptor)) { endJournal(j) }
                    throw error
                }
            } else {
                // A new file starts empty, of the disk's geometry; everything merges into it. Until
                // it is whole, a crash rolls the merge back (recovery finds no destination).
                if newFile != nil {
                    step("creating \(target)")
                    try createEmptyDelta(target, like: upper)
                }
                step("merging \(names) into \((target as NSString).lastPathComponent)")
                _ = try imageErrors { () throws(ImageError) in try Offline.merge(sources: sources, destination: target, format: raw ? .raw : .ploop1, progress: progress) }
            }
            step("writing the descriptor")
            try commit(next)
        }
    }

    /// `snapshot-merge [-u G | -A] [-n DELTA]`: G (default: the top) into its parent; `-A`, the
    /// whole chain into the base.
    /// With `device`, online (see `mergeDown`).
    public func mergeSnapshot(_ guid: GUID?, all: Bool, newDelta: String?, device: String? = nil, progress: (@Sendable (Int, Int) -> Void)? = nil) throws(DiskError) {
        let chain = descriptor.chain()
        if all {
            guard chain.count > 1 else { throw .refused("\(descriptorPath) has one image: there is nothing to merge") }
            try mergeDown(upper: chain[0], lower: chain.last!, operation: "snapshot-merge -A", into: newDelta, device: device, progress: progress)
            return
        }
        let g = guid ?? descriptor.topGUID
        guard let s = descriptor.shot(g) else { throw .unknownGUID(descriptorPath, g) }
        guard !s.parent.isNone else { throw .refused("\(g) is the base image: it has no parent to merge into (unable to merge the base image)") }
        if let device, !chain.contains(g) {
            throw .refused("\(g) is not in the chain \(device) runs (another branch): unmount the disk to merge it")
        }
        try mergeDown(upper: g, lower: s.parent, operation: "snapshot-merge \(guid?.key ?? "top")", into: newDelta, named: guid, device: device, progress: progress)
    }

    /// `snapshot-delete -u G`: the top's file goes (its parent becomes the top); any other G
    /// takes its one child's data into its file, and the child's GUID.
    /// With `device` (online): the top cannot go (it is the device's top, as the original refuses);
    /// a snapshot in the running chain takes its child's data through an online merge; a leaf of
    /// another branch just goes.
    public func deleteSnapshot(_ g: GUID, device: String? = nil, progress: (@Sendable (Int, Int) -> Void)? = nil) throws(DiskError) -> Bool {
        guard let s = descriptor.shot(g) else { throw .unknownGUID(descriptorPath, g) }
        if let device, g == descriptor.topGUID {
            throw .refused("\(g) is the top of the disk running on \(device): unable to delete the active snapshot (unmount the disk first)")
        }
        let kids = descriptor.children(of: g)
        if kids.isEmpty {
            guard !s.parent.isNone else { throw .refused("\(g) is the only image of the disk: unable to delete the base image") }
            // A leaf: its file goes; when it was the top, its parent becomes the top.
            var next = descriptor
            let file = path(of: g)
            next.remove(g)
            if g == descriptor.topGUID {
                guard descriptor.children(of: s.parent).count == 1 else {
                    throw .refused("the top's parent \(s.parent) has other snapshots above it: it cannot become the top; delete them first")
                }
                next.rename(s.parent, to: g)
            }
            let j = Journal(operation: "snapshot-delete \(g.key)", files: [file], descriptor: next.xml())
            try journalled(j) { step throws(DiskError) in
                step("writing the descriptor")
                try commit(next)
            }
            return false
        }
        guard kids.count == 1 else { throw .refused("snapshot \(g) has \(kids.count) children (a branch): delete the other branch first") }
        if let device, !descriptor.chain().contains(g) {
            throw .refused("\(g) is not in the chain \(device) runs (another branch): unmount the disk to delete it")
        }
        try mergeDown(upper: kids[0], lower: g, operation: "snapshot-delete \(g.key)", device: device, progress: progress)
        return true
    }

    /// `snapshot-switch -u G`: the current top goes; a new empty top on G takes its place. With
    /// `keepOldTop` (the original's test flag -D) the old top's file stays on disk, out of the
    /// descriptor (the original keeps it in, under the top GUID beside the new top).
    public func switchSnapshot(_ g: GUID, keepOldTop: Bool = false) throws(DiskError) {
        guard let shot = descriptor.shot(g) else { throw .unknownGUID(descriptorPath, g) }
        let top = descriptor.topGUID
        if g == top { throw .refused("nothing to do: the disk is already on \(g) (its top)") }
        if shot.temporary { throw .refused("snapshot \(g) is temporary (a tsnapshot, merged back once unmounted): switching to it is refused, as the original refuses it") }
        let old = path(of: top)
        let file = newDeltaPath()
        var next = descriptor
        if let i = next.images.firstIndex(where: { $0.guid == top }) { next.images[i].file = relative(file); next.images[i].kind = .compressed }
        if let i = next.shots.firstIndex(where: { $0.guid == top }) { next.shots[i].parent = g; next.shots[i].temporary = false }
        let j = Journal(operation: "snapshot-switch \(g.key)", files: keepOldTop ? [file] : [old, file], descriptor: next.xml())
        try journalled(j) { step throws(DiskError) in
            step("creating the new top \(file)")
            try createEmptyDelta(file, like: g)
            step("writing the descriptor")
            try commit(next)
        }
    }

    // MARK: - grow

    /// Offline grow of a disk: every image of the descriptor (the top's header says the size), then
    /// the descriptor.
    public func grow(toSectors sectors: UInt64) throws(DiskError) {
        let header: ImageHeader
        do { header = try ImageHeader.new(sizeSectors: sectors, clusterSectors: descriptor.blocksize, version: .v2) } catch {
            throw .image(.format(descriptorPath, error))
        }
        let size = header.sizeInSectors
        guard size >= descriptor.diskSizeSectors else {
            throw .image(.shrinkRefused(descriptorPath, currentSectors: descriptor.diskSizeSectors, requestedSectors: sectors))
        }
        guard size > descriptor.diskSizeSectors else { return }
        let next = resized(size)
        let j = Journal(operation: "grow \(size)", files: [], grow: size, descriptor: next.xml())
        try journalled(j) { step throws(DiskError) in
            step("growing the images to \(size) sectors")
            try resizeImages(to: size)
            step("writing the descriptor")
            try commit(next)
        }
    }

    /// Offline shrink of a disk whose file system was made smaller first (`ploop resize`): the
    /// image loses what lies past the new end and its file is compacted, then the descriptor
    /// follows. A disk with snapshots is refused: their images keep the old size, and the
    /// clusters past the end they hold would come back with a switch to them.
    public func shrink(toSectors sectors: UInt64) throws(DiskError) {
        let size = try roundedSize(sectors)
        guard size < descriptor.diskSizeSectors else { return }
        guard descriptor.images.count == 1 else {
            throw .refused("\(descriptorPath) has snapshots: a disk with snapshots is not shrunk (merge them first: 'ploop snapshot-merge -A \(descriptorPath)')")
        }
        let next = resized(size)
        let j = Journal(operation: "resize \(size)", files: [], resize: size, descriptor: next.xml())
        try journalled(j) { step throws(DiskError) in
            step("shrinking the image to \(size) sectors")
            try resizeImages(to: size)
            step("writing the descriptor")
            try commit(next)
        }
    }

    /// `sectors` as a whole number of clusters (as every size of a disk is).
    func roundedSize(_ sectors: UInt64) throws(DiskError) -> UInt64 {
        do { return try ImageHeader.new(sizeSectors: sectors, clusterSectors: descriptor.blocksize, version: .v2).sizeInSectors } catch {
            throw .image(.format(descriptorPath, error))
        }
    }

    /// Every image of the chain at `size`, grown or shrunk (a re-run after a crash finds some
    /// done already).
    func resizeImages(to size: UInt64) throws(DiskError) {
        for g in descriptor.chain().reversed() {
            let raw = descriptor.image(g)!.kind == .plain
            let p = path(of: g)
            if !raw { try repairStaleMark(p) }
            let current = try imageErrors { () throws(ImageError) in try ImageInfo.read(path: p).virtualSize / 512 }
            if current > size {
                try imageErrors { () throws(ImageError) in try Offline.shrink(path: p, toSectors: size, format: raw ? .raw : .ploop1) }
            } else {
                try imageErrors { () throws(ImageError) in try Offline.grow(path: p, toSectors: size, format: raw ? .raw : .ploop1) }
            }
        }
    }

    /// The descriptor at another size; CHS as a header of that size has it.
    func resized(_ size: UInt64) -> DiskDescriptor {
        var next = descriptor
        next.diskSizeSectors = size
        let chs = CHSGeometry(sectors: size)
        next.cylinders = chs.cylinders
        next.heads = chs.heads
        next.sectors = DiskDescriptor.sectors(size: size, cylinders: next.cylinders, heads: next.heads)
        return next
    }

    /// An online grow: `backend` grows `device` to `sectors` (rounded up to a cluster), then the
    /// descriptor follows with the size the device reports. Journalled with the device: if the daemon or
    /// the command dies between the two, the next command on the disk commits the size the
    /// device reached, or, the device gone, grows every image offline and commits it (without the
    /// journal the disk would be refused: its top image bigger than its descriptor says).
    public func growOnline(device: String, backend: any DeviceBackend, toSectors sectors: UInt64) throws(DiskError) {
        let size = try roundedSize(sectors)
        let j = Journal(operation: "grow \(size)", files: [], grow: size, device: device, descriptor: resized(size).xml())
        try journalled(j) { step throws(DiskError) in
            step("growing \(device) to \(size) sectors")
            let reached: UInt64
            do throws(DeviceError) {
                try backend.grow(device, sizeSectors: size)
                reached = try backend.info(device).sizeBytes / 512
            } catch { throw .device(device, error) }
            step("writing the descriptor")
            try commit(resized(reached))
        }
    }

    /// The descriptor with a new size (and the top's CHS).
    public func commitSize(_ size: UInt64) throws(DiskError) {
        try commit(resized(size))
    }

    // MARK: - snapshot-list

    public struct ListRow: Codable, Sendable, Equatable {
        public var uuid: String
        public var parentUUID: String
        public var current: Bool
        public var fname: String
    }

    /// The rows `snapshot-list` prints: base first, or with `from`, that snapshot and its
    /// ancestors (it first); `hideTop` drops the top and marks its parent current.
    public func listRows(from: GUID? = nil, hideTop: Bool = false) throws(DiskError) -> [ListRow] {
        var order: [GUID]
        if let from {
            guard descriptor.shot(from) != nil else { throw .unknownGUID(descriptorPath, from) }
            order = descriptor.chain(from: from)
        } else {
            order = descriptor.shots.map(\.guid)
        }
        let top = descriptor.topGUID
        var current = top
        if hideTop {
            order.removeAll { $0 == top }
            current = descriptor.shot(top)!.parent
        }
        return order.map { g in
            ListRow(uuid: descriptor.shot(g)!.guid.text, parentUUID: descriptor.shot(g)!.parent.text, current: g == current, fname: path(of: g))
        }
    }
}

extension Disk {
    /// The empty delta an offline snapshot adds (like the top: its size, cluster size, version).
    public func createEmptyDeltaForSnapshot(_ file: String) throws(DiskError) {
        try createEmptyDelta(file, like: descriptor.topGUID)
    }
}

extension Disk {
    /// `repairStaleMark` for every ploop1 image of the chain: for a command that starts a device
    /// of its own on a disk no device runs (a crash or a power cut under the last one left the
    /// marks; the device would refuse the images).
    public func repairStaleMarks() throws(DiskError) {
        for g in descriptor.chain() where descriptor.image(g)!.kind == .compressed { try repairStaleMark(path(of: g)) }
    }

    /// An in-use mark on an image of a disk we hold locked and no device runs is a crash's
    /// leftover (an interrupted grow or merge): check and repair it, as mount does.
    func repairStaleMark(_ path: String) throws(DiskError) {
        guard let info = try? ImageInfo.read(path: path), info.format == .ploop1, info.inUse else { return }
        _ = try imageErrors { () throws(ImageError) in try Checker.repairStaleMark(path: path) }
        say("\(path) was not closed cleanly (an interrupted operation); checked and repaired")
    }
}

extension Disk {
    /// `ploop convert -v 1|2 DD`: every ploop1 image of the disk, each crash-safe on its own (see
    /// `Offline.convertVersion`); the descriptor is the same for both versions. Killed half way, the
    /// next command on the disk finishes the image under way, and `convert` again the rest.
    /// Returns the images converted.
    public func convertVersion(to version: FormatVersion) throws(DiskError) -> [String] {
        var done: [String] = []
        for i in descriptor.images where i.kind == .compressed {
            let p = resolve(i.file)
            if try imageErrors({ () throws(ImageError) in try Offline.convertVersion(path: p, to: version) }) { done.append(p) }
            if let left = Offline.leftoverConversionFile(of: p) {
                say("warning: cannot remove \(left) (the conversion of \(i.file) is done); the next command on the disk removes it")
            }
        }
        return done
    }
}

extension Disk {
    /// Which image `replace` means.
    public enum ImageSelector: Sendable {
        case guid(GUID)
        /// Distance from the base along the running chain (0 = base).
        case level(Int)
        case file(String)
    }

    /// The image a selector names.
    public func select(_ s: ImageSelector) throws(DiskError) -> GUID {
        switch s {
        case .guid(let g):
            guard descriptor.image(g) != nil else { throw .unknownGUID(descriptorPath, g) }
            return g
        case .level(let l):
            let chain = Array(descriptor.chain().reversed())
            guard l >= 0, l < chain.count else { throw .refused("-l \(l): the disk has levels 0..\(chain.count - 1) (0 is the base)") }
            return chain[l]
        case .file(let f):
            let id = PathInfo.identity(Self.absolutePath(f))
            guard let id, let i = descriptor.images.first(where: { PathInfo.identity(resolve($0.file)) == id }) else {
                throw .refused("\(f) is not an image of \(descriptorPath)")
            }
            return i.guid
        }
    }

    /// `ploop replace {-u GUID | -l LEVEL | -o FILE} [-k] -i NEWDELTA DD` offline: the image's
    /// file becomes NEWDELTA, which must be an image of the same kind, cluster size and virtual
    /// size that `check` finds sound. With `keepName`, NEWDELTA is renamed over the old file (the
    /// descriptor does not change); otherwise the descriptor names NEWDELTA and the old file is
    /// left where it is. Either way one atomic step (a rename) makes the change.
    public func replace(_ selector: ImageSelector, with newDelta: String, keepName: Bool) throws(DiskError) -> GUID {
        let g = try select(selector)
        let old = path(of: g)
        let new = Self.absolutePath(newDelta)
        guard PathInfo.kind(new) == .regular else { throw .image(PathInfo.kind(new) == .missing ? .notFound(new) : .notRegularFile(new)) }
        if PathInfo.identity(new) == PathInfo.identity(old) { throw .refused("\(new) is already the file of \(g)") }
        if descriptor.images.contains(where: { PathInfo.identity(resolve($0.file)) == PathInfo.identity(new) }) {
            throw .refused("\(new) is already an image of \(descriptorPath) (of another snapshot)")
        }
        let kind = descriptor.image(g)!.kind
        let was = try imageErrors { () throws(ImageError) in try ImageInfo.read(path: old) }
        let now = try imageErrors { () throws(ImageError) in try ImageInfo.read(path: new) }
        guard now.format == was.format else { throw .refused("\(new) is \(now.format.rawValue), but \(g) is \(was.format.rawValue)") }
        guard now.virtualSize == was.virtualSize else {
            throw .refused("\(new) is \(now.virtualSize / 512) sectors, but \(g) is \(was.virtualSize / 512): a replacement must be the same size")
        }
        if kind == .compressed {
            guard now.clusterSize == was.clusterSize else { throw .refused("\(new) has clusters of \((now.clusterSize ?? 0) / 512) sectors, the disk \(descriptor.blocksize)") }
            if now.inUse { throw .image(.inUse(new)) }
            try imageErrors { () throws(ImageError) in try Checker.validate(try ImagePath.open(new, write: false)) }
        }
        if keepName {
            do { try PathInfo.publish(new, as: old, replace: true) } catch { throw .io("renaming \(new) to \(old): \(error)") }
            return g
        }
        var next = descriptor
        if let i = next.images.firstIndex(where: { $0.guid == g }) { next.images[i].file = relative(new) }
        try commit(next)
        return g
    }
}

extension Disk {
    /// Where a layout conversion builds the image's new file until it is renamed over the image.
    public static func layoutFile(of image: String) -> String { image + ".layout" }

    /// The disk's layout: raw when the base is Plain, else preallocated or expanded as the
    /// descriptor says.
    public var layout: Offline.Layout {
        baseFormat == .raw ? .raw : (descriptor.preallocated ? .preallocated : .expanded)
    }

    /// `ploop convert -f raw|preallocated|expanded DD` offline. What it reads is unchanged.
    ///
    /// * preallocated → expanded: only the descriptor (the blocks stay, as the original does);
    /// * expanded → preallocated: every cluster without a block gets one in place
    ///   (`Offline.preallocate`, crash-safe and idempotent), then the descriptor;
    /// * to or from raw: the new file is built beside the image (`IMAGE.layout`, synced), a
    ///   journal names it and the descriptor to follow, it is renamed over the image, the
    ///   descriptor committed. Killed before the journal, the next command drops `IMAGE.layout`;
    ///   after it, the next command finishes the rename and the descriptor.
    ///
    /// A disk with snapshots is refused (but for → expanded): the original converts only its
    /// first image and leaves a chain whose deltas no longer fit. Returns false when the disk
    /// already has that layout.
    public func convertLayout(to target: Offline.Layout, version: FormatVersion, progress: (@Sendable (Int, Int) -> Void)? = nil) throws(DiskError) -> Bool {
        let current = layout
        guard current != target else { return false }
        guard descriptor.images.count == 1 || (current, target) == (.preallocated, .expanded) else {
            throw .refused("\(descriptorPath) has snapshots (\(descriptor.images.count) images): converting it to \(target.rawValue) needs a single image; merge them first with 'ploop snapshot-merge -A'")
        }
        let g = descriptor.chain()[0]
        let image = path(of: g)
        var next = descriptor
        next.preallocated = target == .preallocated
        if let i = next.images.firstIndex(where: { $0.guid == g }) { next.images[i].kind = target == .raw ? .plain : .compressed }
        switch (current, target) {
        case (.preallocated, .expanded):
            try commit(next)
            return true
        case (.expanded, .preallocated):
            try repairStaleMark(image)
            try imageErrors { () throws(ImageError) in
                let f = try ImagePath.open(image, write: true)
                try ImagePath.lock(f, exclusive: true)
                try Offline.preallocate(f, progress: progress)
            }
            try commit(next)
            return true
        default:
            break
        }
        let staged = Self.layoutFile(of: image)
        PathInfo.removeRegularFile(staged)
        if current != .raw { try repairStaleMark(image) }
        try imageErrors { () throws(ImageError) in
            do throws(ImageError) {
                let source = try ImagePath.open(image, write: false)
                try ImagePath.lock(source, exclusive: true)
                let out = try PosixBlockFile(path: staged, mode: .createNew)
                if target == .raw {
                    try Checker.validate(source)
                    let old = try Ploop1Image(file: source, writable: false)
                    try out.truncate(to: old.virtualBytes)
                    try Offline.expand(old, intoRaw: out, progress: progress)
                } else {
                    let header: ImageHeader
                    do throws(FormatError) { header = try ImageHeader.new(sizeSectors: descriptor.diskSizeSectors, clusterSectors: descriptor.blocksize, version: version) } catch {
                        throw ImageError.format(image, error)
                    }
                    try Ploop1Image.create(on: out, header: header)
                    try Offline.compact(raw: source, into: try Ploop1Image(file: out, writable: true), progress: progress)
                    if target == .preallocated { try Offline.preallocate(out) }
                }
            } catch {
                PathInfo.removeRegularFile(staged)
                throw error
            }
        }
        PathInfo.syncParentDirectory(of: staged)
        let j = Journal(operation: "convert -f \(target.rawValue)", files: [], publish: .init(from: staged, to: image), descriptor: next.xml())
        try journalled(j) { step throws(DiskError) in
            step("renaming \(staged) over \(image)")
            do { try PathInfo.publish(staged, as: image, replace: true) } catch { throw .io("renaming \(staged) to \(image): \(error)") }
            step("writing the descriptor")
            try commit(next)
        }
        return true
    }
}
