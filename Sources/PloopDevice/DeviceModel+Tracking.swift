import PloopImage

extension DeviceModel {
    /// The current end of the top image file, in bytes.
    func topEnd() throws(DeviceError) -> UInt64 {
        try stack.read { s throws(DeviceError) -> UInt64 in
            guard s.running else { throw .notRunning("device") }
            switch s.top.image {
            case .ploop1(let i): return UInt64(i.allocHead) * UInt64(clusterBytes)
            case .raw(let r): return try lifting { () throws(ImageError) in try r.file.size() }
            }
        }
    }

    /// PLOOP_IOC_TRACK_INIT: starts recording writes to the top image; returns its current end.
    public func trackInit() throws(DeviceError) -> UInt64 {
        let end = try topEnd()
        try control.withLock { c throws(DeviceError) in try c.machine.startTracking() }
        watch.tracker.withLock { $0 = DirtyTracker(clusterBytes: clusterBytes) }
        return end
    }

    func withTracker<T>(_ body: (inout DirtyTracker) throws(DeviceError) -> T) throws(DeviceError) -> T {
        try watch.tracker.withLock { t throws(DeviceError) -> T in
            guard var tracker = t else { throw .wrongState(.tracking, .off) }
            defer { t = tracker }
            return try body(&tracker)
        }
    }

    /// PLOOP_IOC_TRACK_SETPOS: the copier has taken the file up to `position`.
    public func trackSetPosition(_ position: UInt64) throws(DeviceError) {
        try withTracker { t throws(DeviceError) in try t.setPosition(position) }
    }

    /// PLOOP_IOC_TRACK_READ: the next dirty extent of the top image (bytes), or nil (EAGAIN).
    public func trackRead() throws(DeviceError) -> Range<UInt64>? {
        let end = try topEnd()
        return try withTracker { t throws(DeviceError) in try t.read(fileEnd: end) }
    }

    /// PLOOP_IOC_TRACK_STOP: refused while dirty extents remain unread.
    public func trackStop() throws(DeviceError) {
        try withTracker { t throws(DeviceError) in
            if t.hasDirty { throw .unreadExtents }
        }
        watch.tracker.withLock { $0 = nil }
        try control.withLock { c throws(DeviceError) in try c.machine.stopTracking() }
    }

    /// PLOOP_IOC_TRACK_ABORT.
    public func trackAbort() throws(DeviceError) {
        watch.tracker.withLock { $0 = nil }
        try control.withLock { c throws(DeviceError) in try c.machine.stopTracking() }
    }
}
