import Foundation
import Testing

/// Outputs held to files under fixtures/golden: a changed output shows as a diff in review.
/// `PLOOP_UPDATE_GOLDEN=1` rewrites them (then read the diff before committing).
public enum Golden {
    public static let root = TestSupport.packageRoot.appendingPathComponent("fixtures/golden").path
    public static let update = ProcessInfo.processInfo.environment["PLOOP_UPDATE_GOLDEN"] == "1"

    public static func compare(_ text: String, _ name: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let path = root + "/" + name
        if update {
            try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            return
        }
        guard let golden = try? String(contentsOfFile: path, encoding: .utf8) else {
            Issue.record("\(name) has no golden file: run the test with PLOOP_UPDATE_GOLDEN=1", sourceLocation: sourceLocation)
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

    /// A JSON document's shape: one line per key path with the type of its value (`.a.b: number`;
    /// arrays as `[]`, the union of their elements' shapes), sorted. For documents whose values
    /// are the host's or the moment's (devices, timings); `optional` lines (keys printed only in
    /// some states) are recorded whether or not this run printed them.
    public static func shape(_ json: String, optional: [String] = []) throws -> String {
        var lines = Set(optional)
        func visit(_ v: Any, _ p: String) {
            switch v {
            case let d as [String: Any]:
                lines.insert("\(p.isEmpty ? "." : p): object")
                for (k, x) in d { visit(x, p + "." + k) }
            case let a as [Any]:
                lines.insert("\(p.isEmpty ? "." : p): array")
                for x in a { visit(x, (p.isEmpty ? "." : p) + "[]") }
            case let n as NSNumber:
                // JSONSerialization gives booleans as NSNumber of ObjC type "c" (char).
                lines.insert("\(p): \(String(cString: n.objCType) == "c" ? "bool" : "number")")
            case is String: lines.insert("\(p): string")
            default: lines.insert("\(p): null")
            }
        }
        visit(try JSONSerialization.jsonObject(with: Data(json.utf8)), "")
        return lines.sorted().joined(separator: "\n") + "\n"
    }

    /// `compare` of a document's `shape`.
    public static func compareShape(_ json: String, _ name: String, optional: [String] = [], sourceLocation: SourceLocation = #_sourceLocation) throws {
        try compare(try shape(json, optional: optional), name, sourceLocation: sourceLocation)
    }
}
