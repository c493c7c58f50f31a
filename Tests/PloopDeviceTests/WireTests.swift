import Foundation
import PloopDevice
import PloopImage
import PloopSimulator
import Testing

/// The simulator's control protocol: every request and reply survives the trip, errors keep their
/// case, and what is not a request of this version is refused with the reason, never read with a
/// default.
struct WireTests {
    static let requests: [Wire.Request] = [
        .info, .umount, .snapshot(newDelta: "/d/root.hds.{x}"), .merge(from: 1, to: 3), .grow(sizeSectors: 1 << 30), .sync,
        .deleteDelta(level: 2), .updateIndex(level: 1, maps: [IndexMap(cluster: 7, block: 9)]), .balloon(inflate: true, keepIntact: false),
        .loadFreeBlocks(level: 0, extents: [FreeExtent(cluster: 1, block: 2, length: 3)]), .freeBlockList, .filterFreeBlocks(minLength: 4),
        .dropFreeBlocks, .relocateBlocks(level: 0, allocHead: 99, extents: [RelocExtent(cluster: 5, block: 6, length: 1, free: true)]),
        .trackInit, .trackSetPosition(4096), .trackRead, .trackStop, .trackAbort,
    ]

    @Test(arguments: requests)
    func requestsRoundTrip(_ r: Wire.Request) throws {
        let line = try JSONEncoder().encode(Wire.Message(r))
        #expect(try Wire.decodeRequest(line).get() == r)
    }

    @Test func repliesAndErrorsRoundTrip() throws {
        let replies: [Wire.Reply] = [
            .done, .progress(MergeProgress(done: 3, total: 9)), .blocks(12), .end(1 << 40), .dirty(4096..<8192), .dirty(nil), .paths(["/a", "/b"]),
            .freeExtents([FreeExtent(cluster: 1, block: 2, length: 3)]),
            .failed(.busy(.merge)), .failed(.image(.inUse("/x/root.hds"))), .failed(.image(.io(.init("pread", path: "/x", errno: EIO)))),
            .failed(.image(.format("/x", .sizeTooLarge(sectors: 9, limit: 8, version: .v1)))), .failed(.outOfRange(offset: 1, length: 2, size: 3)),
            .failed(.image(.injectedCrash)),
        ]
        for r in replies {
            let back = try JSONDecoder().decode(Wire.Reply.self, from: try JSONEncoder().encode(r))
            #expect(back == r)
        }
    }

    @Test(arguments: [
        (#"{"version":2,"request":{"merge":{"from":1}}}"#, "malformed control request"),
        (#"{"version":2,"request":{"deleteDelta":{}}}"#, "malformed control request"),
        (#"{"version":2,"request":{"format":{}}}"#, "malformed control request"),
        (#"{"version":1,"op":"info"}"#, "control protocol version 1 is not 2"),
        (#"{"op":"info"}"#, "not a control request"),
        ("garbage", "not a control request"),
    ])
    func whatIsNotARequestIsRefused(_ line: String, _ expect: String) {
        switch Wire.decodeRequest(Data(line.utf8)) {
        case .success(let r): Issue.record("\(line) decoded as \(r)")
        case .failure(let e):
            guard case .protocolMismatch(let why) = e else { Issue.record("\(e) is not a protocol mismatch"); return }
            #expect(why.contains(expect), "\(e)")
        }
    }

    @Test func theLaunchDescriptionIsSharedBothWays() throws {
        let l = Wire.Launch(index: 7, threads: 2, runDir: "/run/ploop", request: MountRequest(images: ["/d/a", "/d/b"], baseFormat: .raw, readOnly: true, device: "/dev/ploop7", clusterSectors: 128))
        let args = try l.arguments(executable: "/usr/bin/ploop")
        #expect(args.prefix(3) == ["/usr/bin/ploop", "__serve", "--launch"])
        #expect(try Wire.Launch.decode(args[3]) == l)
    }
}
