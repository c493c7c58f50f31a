/// The kernel's maintenance states (`PLOOP_MNTN_*`), with the values `ploop_balloon_ctl.mntn_type`
/// carries. Only one maintenance runs at a time.
public enum MaintenanceState: UInt32, Sendable, Codable, CaseIterable, CustomStringConvertible {
    case off = 0
    case balloon = 1
    case fbloaded = 2
    case snapshot = 3
    case track = 4
    case discard = 5
    case merge = 257
    case grow = 258
    case reloc = 259
    case pushBackup = 260

    /// The words `ploop balloon status` prints (the original names SNAPSHOT "UNKNOWN"; we name it).
    public var description: String {
        switch self {
        case .off: "OFF"
        case .balloon: "BALLOON"
        case .fbloaded: "FBLOADED"
        case .snapshot: "SNAPSHOT"
        case .track: "TRACK"
        case .discard: "DISCARD"
        case .merge: "MERGE"
        case .grow: "GROW"
        case .reloc: "RELOC"
        case .pushBackup: "PUSH_BACKUP"
        }
    }
}

/// The maintenance state machine as a pure value: each event either moves the state or throws the
/// error the kernel's ioctl returns. The device owns one inside a lock.
public struct MaintenanceMachine: Sendable, Equatable {
    public private(set) var state: MaintenanceState = .off

    public init(state: MaintenanceState = .off) { self.state = state }

    /// Starts an exclusive maintenance (snapshot, merge, grow): only from OFF.
    public mutating func begin(_ op: MaintenanceState) throws(DeviceError) {
        guard state == .off else { throw .busy(state) }
        state = op
    }

    /// Ends the maintenance `op`; a mismatch is a programming error.
    public mutating func end(_ op: MaintenanceState) {
        precondition(state == op, "ending \(op) while in \(state)")
        state = .off
    }

    /// PLOOP_IOC_BALLOON. `keepIntact` is a pure query; `inflate` enters BALLOON from OFF;
    /// neither leaves BALLOON for OFF. Other states are reported, not changed.
    public mutating func balloon(inflate: Bool, keepIntact: Bool) throws(DeviceError) -> MaintenanceState {
        if inflate && keepIntact { throw .conflictingFlags("inflate and keep-intact together") }
        if keepIntact { return state }
        if inflate {
            if state == .off { state = .balloon }
        } else if state == .balloon {
            state = .off
        }
        return state
    }

    /// PLOOP_IOC_FREEBLKS: only in BALLOON (OFF: EINVAL, others: EBUSY).
    public mutating func loadFreeBlocks() throws(DeviceError) {
        switch state {
        case .balloon: state = .fbloaded
        case .off: throw .wrongState(.loadFreeBlocks, .off)
        default: throw .busy(state)
        }
    }

    /// PLOOP_IOC_RELOCBLKS: from FBLOADED (or a RELOC being resumed).
    public mutating func startRelocation() throws(DeviceError) {
        guard state == .fbloaded || state == .reloc else {
            throw .wrongState(.relocateBlocks, state)
        }
        state = .reloc
    }

    public mutating func finishRelocation() {
        precondition(state == .reloc || state == .fbloaded)
        state = .off
    }

    /// PLOOP_IOC_FBDROP: the free-block list is dropped; FBLOADED goes back to OFF.
    public mutating func dropFreeBlocks() throws(DeviceError) {
        switch state {
        case .fbloaded, .discard, .balloon: state = .off
        case .off: break
        default: throw .busy(state)
        }
    }

    /// PLOOP_IOC_TRACK_INIT: only from OFF.
    public mutating func startTracking() throws(DeviceError) { try begin(.track) }

    public mutating func stopTracking() throws(DeviceError) {
        guard state == .track else { throw .wrongState(.tracking, state) }
        state = .off
    }
}
