import CPloopSys

/// The kernel's ioctl request numbers, as the C shim builds them with the kernel's macros.
public enum KernelIoctl: Int32, CaseIterable, Sendable {
    case addDelta = 0, clear, stop, start, snapshot, delDelta, trackInit, trackStop, trackAbort, trackSetPos
    case trackRead, sync, merge, replaceDelta, truncate, `internal`, updateIndex, grow, fbGet, balloon
    case freeBlocks, relocBlocks, getDevice, discardInit, discardFini, discardWait, fbDrop, fbFilter
    case maxDeltaSize, pushBackupInit, pushBackupIO, pushBackupStop, freeze, thaw

    public var request: UInt { UInt(cploop_ioctl_number(rawValue)) }
}
