import Foundation

extension DiskDescriptor {
    // MARK: - Writing: the original's text, byte for byte

    /// The descriptor as the original writes it: `<?xml version="1.0"?>`, two-space indent, LF,
    /// elements in the order of the layout above, a final newline.
    public func xml() -> String {
        var out = "<?xml version=\"1.0\"?>\n<Parallels_disk_image>\n"
        func line(_ depth: Int, _ s: String) { out += String(repeating: "  ", count: depth) + s + "\n" }
        func element(_ depth: Int, _ name: String, _ value: String) { line(depth, "<\(name)>\(Self.escape(value))</\(name)>") }
        line(1, "<Disk_Parameters>")
        element(2, "Disk_size", "\(diskSizeSectors)")
        if let m = maxDeltaSizeSectors, m != 0 { element(2, "Max_delta_size", "\(m)") }
        element(2, "Cylinders", "\(cylinders)")
        element(2, "Heads", "\(heads)")
        element(2, "Sectors", "\(sectors)")
        element(2, "Padding", "0")
        if let k = encryptionKeyId {
            line(2, "<Encryption>")
            element(3, "KeyId", k)
            line(2, "</Encryption>")
        }
        line(1, "</Disk_Parameters>")
        line(1, "<StorageData>")
        if let v = volume {
            line(2, "<Volume>")
            element(3, "Parent", v.parent)
            element(3, "SnapshotGUID", v.snapshotGUID)
            if let r = v.readOnly { element(3, "ReadOnly", r) }
            line(2, "</Volume>")
        }
        line(2, "<Storage>")
        element(3, "Start", "0")
        element(3, "End", "\(diskSizeSectors)")
        element(3, "Blocksize", "\(blocksize)")
        if preallocated { element(3, "Preallocated", "1") }
        // The original keeps one mode per disk: a raw (Plain) base makes it write Plain for every
        // image, the ploop1 deltas above included.
        let rawMode = base.flatMap(image)?.kind == .plain
        for i in images {
            line(3, "<Image>")
            element(4, "GUID", i.guid.text)
            element(4, "Type", rawMode ? Image.Kind.plain.rawValue : i.kind.rawValue)
            element(4, "File", i.file)
            line(3, "</Image>")
        }
        line(2, "</Storage>")
        line(1, "</StorageData>")
        line(1, "<Snapshots>")
        element(2, "TopGUID", topGUID.text)
        for s in shots {
            line(2, "<Shot>")
            element(3, "GUID", s.guid.text)
            element(3, "ParentGUID", s.parent.text)
            if s.temporary { line(3, "<Temporary/>") }
            line(2, "</Shot>")
        }
        line(1, "</Snapshots>")
        out += "</Parallels_disk_image>\n"
        return out
    }

    static func escape(_ s: String) -> String {
        // As libxml2 writes text: a CR is a reference, or a reader would take it for a line end.
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
            .replacingOccurrences(of: "\r", with: "&#13;")
    }

    // MARK: - Reading: strict where the original is lenient

    /// Parses descriptor text. Like the original, an encoding declaration, comments and unknown
    /// elements are not kept (they are not written back). Unlike it, a descriptor that cannot be
    /// trusted is refused: another root element, no or two Storage, an Image without a Shot or
    /// the reverse, two images with one GUID, a ParentGUID naming nothing, a cycle, no TopGUID or
    /// one that names nothing, numbers that are not numbers. `path` is for messages.
    public static func parse(_ data: Data, path: String) throws(DiskError) -> DiskDescriptor {
        let root = try elementTree(data, path: path)
        let r = ElementReader(path: path)
        var d = try r.parameters(of: root)
        try r.storage(of: root, into: &d)
        try r.snapshots(of: root, into: &d)
        try d.checkTree(path: path)
        // One Plain image makes the whole disk raw for the original (it writes Plain for every
        // image of a raw disk, the ploop1 snapshots above the base included): the base is the
        // raw file and every image above it is a ploop1 delta.
        if d.images.contains(where: { $0.kind == .plain }) {
            if d.preallocated { throw .invalid(path, element: "Preallocated", "is set on a Plain (raw) disk: only ploop1 disks are preallocated") }
            let base = d.base
            for k in d.images.indices { d.images[k].kind = d.images[k].guid == base ? .plain : .compressed }
        }
        return d
    }

    /// The element tree of descriptor text (DescriptorXML); refuses text that is not UTF-8, is
    /// not well-formed XML, is cut short, has a DTD or a processing instruction, or has another
    /// root element, each with where the damage is.
    static func elementTree(_ data: Data, path: String) throws(DiskError) -> DescriptorXML.Element {
        if let bad = firstInvalidUTF8(data) {
            throw .malformed(path, "it is not UTF-8 text (an invalid sequence at byte \(bad)): restore it from a backup or rewrite the damaged line")
        }
        let root: DescriptorXML.Element
        do {
            root = try DescriptorXML.parse([UInt8](data))
        } catch {
            switch error {
            case .empty: throw .malformed(path, "the XML does not parse (the file is empty)")
            case .cutShort(let inside): throw .malformed(path, "it ends inside \(inside) (the file is cut short)")
            case .notWellFormed(let what, let offset, let line):
                throw .malformed(path, "it is not well-formed XML (line \(line), byte \(offset): \(what))")
            case .dtd(let offset): throw .malformed(path, "it declares a DTD or entities (at byte \(offset))")
            case .processingInstruction(let offset):
                throw .malformed(path, "it holds a processing instruction (<?…?>) at byte \(offset): a descriptor has none but the <?xml …?> declaration")
            case .encoding(let name): throw .malformed(path, "it declares the encoding \(name), but holds text that is not ASCII: a descriptor is UTF-8")
            }
        }
        guard root.name == "Parallels_disk_image" else { throw .invalid(path, element: root.name, "is not Parallels_disk_image") }
        return root
    }

    /// The offset of the first byte that does not belong to a valid UTF-8 sequence, if any.
    static func firstInvalidUTF8(_ data: Data) -> Int? {
        var iterator = data.makeIterator()
        var decoder = UTF8()
        var offset = 0
        while true {
            switch decoder.decode(&iterator) {
            case .scalarValue(let s): offset += UTF8.width(s)
            case .emptyInput: return nil
            case .error: return offset
            }
        }
    }

    /// The GUID rules: one Shot per Image, parents that exist, one base, no cycle, a top that
    /// exists and is a leaf.
    func checkTree(path: String) throws(DiskError) {
        for i in images where shot(i.guid) == nil { throw .invalid(path, element: "Image", "\(i.guid) has no <Shot>") }
        for s in shots where image(s.guid) == nil { throw .invalid(path, element: "Shot", "\(s.guid) names no <Image>") }
        for s in shots where !s.parent.isNone && shot(s.parent) == nil {
            throw .invalid(path, element: "ParentGUID", "\(s.parent) of snapshot \(s.guid) names no snapshot")
        }
        if shots.contains(where: { $0.guid.isNone }) { throw .invalid(path, element: "GUID", "is the zero GUID, which means 'no parent'") }
        let bases = shots.filter { $0.parent.isNone }
        guard bases.count == 1 else {
            throw .invalid(path, element: "ParentGUID", bases.isEmpty ? "is never the zero GUID: there is no base image (a cycle?)" : "is the zero GUID for \(bases.count) images: a disk has one base")
        }
        guard image(topGUID) != nil else { throw .invalid(path, element: "TopGUID", "\(topGUID) names no image") }
        if !children(of: topGUID).isEmpty { throw .invalid(path, element: "TopGUID", "\(topGUID) has snapshots above it: the top must be a leaf") }
        // Every image reaches the base without looping.
        for s in shots {
            var seen: Set<GUID> = []
            var g = s.guid
            while !g.isNone {
                guard seen.insert(g).inserted, let next = shot(g) else { throw .invalid(path, element: "ParentGUID", "chain from \(s.guid) loops") }
                g = next.parent
            }
        }
    }
}

/// Reads a descriptor's elements strictly: each rule broken names the element and what is wrong.
struct ElementReader {
    typealias XMLElement = DescriptorXML.Element
    let path: String

    func children(_ e: XMLElement, _ name: String) -> [XMLElement] { e.children.filter { $0.name == name } }

    func one(_ e: XMLElement, _ name: String, in parent: String) throws(DiskError) -> XMLElement {
        let found = children(e, name)
        guard found.count == 1 else {
            throw .invalid(path, element: name, found.isEmpty ? "is missing from <\(parent)>" : "appears \(found.count) times in <\(parent)>")
        }
        return found[0]
    }

    func optional(_ e: XMLElement, _ name: String, in parent: String) throws(DiskError) -> XMLElement? {
        let found = children(e, name)
        guard found.count <= 1 else { throw .invalid(path, element: name, "appears \(found.count) times in <\(parent)>") }
        return found.first
    }

    func value(_ e: XMLElement) -> String { e.text.trimmingCharacters(in: .whitespacesAndNewlines) }

    func number<T: FixedWidthInteger>(_ e: XMLElement, _ type: T.Type) throws(DiskError) -> T {
        let v = value(e)
        guard !v.isEmpty, v.allSatisfy({ $0.isASCII && $0.isNumber }), let n = T(v) else {
            throw .invalid(path, element: e.name, "holds \"\(v)\", not a number")
        }
        return n
    }

    func guid(_ e: XMLElement) throws(DiskError) -> GUID {
        guard let g = GUID(parsing: value(e)) else { throw .invalid(path, element: e.name, "holds \"\(value(e))\", not a GUID") }
        return g
    }

    /// <Disk_Parameters>: the size and geometry (the images and snapshots come later).
    func parameters(of root: XMLElement) throws(DiskError) -> DiskDescriptor {
        let params = try one(root, "Disk_Parameters", in: "Parallels_disk_image")
        let size = try number(try one(params, "Disk_size", in: "Disk_Parameters"), UInt64.self)
        let maxDelta = try optional(params, "Max_delta_size", in: "Disk_Parameters").map { (e) throws(DiskError) in try number(e, UInt64.self) }
        let cylinders = try optional(params, "Cylinders", in: "Disk_Parameters").map { (e) throws(DiskError) in try number(e, UInt32.self) } ?? 0
        let heads = try optional(params, "Heads", in: "Disk_Parameters").map { (e) throws(DiskError) in try number(e, UInt32.self) } ?? 0
        let sectors = try optional(params, "Sectors", in: "Disk_Parameters").map { (e) throws(DiskError) in try number(e, UInt32.self) }
        let keyId = try optional(params, "Encryption", in: "Disk_Parameters").map { (e) throws(DiskError) in value(try one(e, "KeyId", in: "Encryption")) }
        var d = DiskDescriptor(diskSizeSectors: size, cylinders: cylinders, heads: heads, blocksize: 0, images: [], topGUID: .top, shots: [])
        if let sectors { d.sectors = sectors }
        d.maxDeltaSizeSectors = maxDelta
        d.encryptionKeyId = keyId
        return d
    }

    /// <StorageData>: the volume, the one <Storage> with its block size, mode and images.
    func storage(of root: XMLElement, into d: inout DiskDescriptor) throws(DiskError) {
        let size = d.diskSizeSectors
        let storageData = try one(root, "StorageData", in: "Parallels_disk_image")
        let storages = children(storageData, "Storage")
        guard storages.count == 1 else {
            throw .invalid(path, element: "Storage", storages.isEmpty ? "is missing" : "appears \(storages.count) times (a split disk is not supported)")
        }
        let storage = storages[0]
        var volume: DiskDescriptor.Volume?
        if let v = try optional(storageData, "Volume", in: "StorageData") {
            volume = DiskDescriptor.Volume(
                parent: value(try one(v, "Parent", in: "Volume")), snapshotGUID: value(try one(v, "SnapshotGUID", in: "Volume")),
                readOnly: try optional(v, "ReadOnly", in: "Volume").map(value))
        }
        if let start = try optional(storage, "Start", in: "Storage"), try number(start, UInt64.self) != 0 {
            throw .invalid(path, element: "Start", "is \(value(start)): only 0 is supported")
        }
        if let end = try optional(storage, "End", in: "Storage"), try number(end, UInt64.self) != size {
            throw .invalid(path, element: "End", "is \(value(end)) but <Disk_size> is \(size)")
        }
        let blocksize = try number(try one(storage, "Blocksize", in: "Storage"), UInt32.self)
        let preallocated = try optional(storage, "Preallocated", in: "Storage").map { (e) throws(DiskError) in try number(e, UInt32.self) != 0 } ?? false

        var images: [DiskDescriptor.Image] = []
        for e in children(storage, "Image") {
            let g = try guid(try one(e, "GUID", in: "Image"))
            let typeText = value(try one(e, "Type", in: "Image"))
            guard let kind = DiskDescriptor.Image.Kind(rawValue: typeText) else { throw .invalid(path, element: "Type", "holds \"\(typeText)\": Compressed or Plain") }
            let file = value(try one(e, "File", in: "Image"))
            guard !file.isEmpty else { throw .invalid(path, element: "File", "of image \(g) is empty") }
            if images.contains(where: { $0.guid == g }) { throw .invalid(path, element: "Image", "\(g) appears twice") }
            images.append(DiskDescriptor.Image(guid: g, kind: kind, file: file))
        }
        guard !images.isEmpty else { throw .invalid(path, element: "Image", "is missing: the disk has no image") }

        d.blocksize = blocksize
        d.preallocated = preallocated
        d.volume = volume
        d.images = images
    }

    /// <Snapshots>: the top GUID and one <Shot> per image.
    func snapshots(of root: XMLElement, into d: inout DiskDescriptor) throws(DiskError) {
        let snapshots = try one(root, "Snapshots", in: "Parallels_disk_image")
        let top = try guid(try one(snapshots, "TopGUID", in: "Snapshots"))
        var shots: [DiskDescriptor.Shot] = []
        for e in children(snapshots, "Shot") {
            let g = try guid(try one(e, "GUID", in: "Shot"))
            let parent = try guid(try one(e, "ParentGUID", in: "Shot"))
            if shots.contains(where: { $0.guid == g }) { throw .invalid(path, element: "Shot", "\(g) appears twice") }
            shots.append(DiskDescriptor.Shot(guid: g, parent: parent, temporary: !children(e, "Temporary").isEmpty))
        }

        d.topGUID = top
        d.shots = shots
    }
}
