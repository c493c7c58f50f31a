import Testing
@testable import PloopVolume

/// The progress that mke2fs's output gives, parsed from a recorded stream (e2fsprogs 1.47).
struct VolumeParsingTests {
    @Test func mke2fsCountersBecomeProgress() {
        var p = CountParser()
        let stream = "Allocating group tables:   0/160\u{8}\u{8}\u{8}\u{8}\u{8}\u{8}\u{8}  80/160\u{8}\u{8}\u{8}\u{8}\u{8}\u{8}\u{8}       \u{8}\u{8}\u{8}\u{8}\u{8}\u{8}\u{8}done                            \nWriting inode tables:   0/160"
        let bytes = Array(stream.utf8)
        // Fed in two pieces, as a pipe may deliver it.
        let got = p.feed(bytes[0..<40]) + p.feed(bytes[40...])
        #expect(got.map { "\($0.0) \($0.1)/\($0.2)" } == [
            "Allocating group tables 0/160", "Allocating group tables 80/160", "Allocating group tables 160/160", "Writing inode tables 0/160",
        ])
    }

    @Test func linesSplitWherever() {
        var s = LineSplitter()
        #expect(s.feed(Array("1 5 10\n1 6".utf8)[...]) == ["1 5 10"])
        #expect(s.feed(Array(" 10\n".utf8)[...]) == ["1 6 10"])
    }
}
