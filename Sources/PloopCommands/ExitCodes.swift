import ArgumentParser
import PloopBalloon
import PloopCopy
import PloopDevice
import PloopDisk
import PloopFormat
import PloopImage
import PloopSystem
import PloopVolume

/// The exit status of every command: the original tool's SYSEXIT_* values (include/libploop.h)
/// where it has one for the case, so scripts written for the original read ours the same way.
/// One table, printed by `ploop --help` and copied into README's "Exit codes".
public enum ExitCodes {
    public static let success: Int32 = 0
    public static let failure: Int32 = 1
    public static let device: Int32 = 2
    public static let deviceIoctl: Int32 = 3
    public static let open: Int32 = 4
    public static let format: Int32 = 11
    public static let system: Int32 = 12
    public static let protocolError: Int32 = 13
    public static let busy: Int32 = 17
    public static let fallocate: Int32 = 20
    public static let mount: Int32 = VolumeError.mount
    public static let umount: Int32 = VolumeError.umount
    public static let lock: Int32 = 23
    public static let mkfs: Int32 = VolumeError.mkfs
    public static let resizeFS: Int32 = VolumeError.resizeFS
    public static let aborted: Int32 = 29
    public static let partitionTable: Int32 = VolumeError.changeGPT
    public static let inUse: Int32 = 37
    public static let param: Int32 = VolumeError.param
    public static let descriptor: Int32 = 39
    public static let notMounted: Int32 = 40
    public static let fsck: Int32 = VolumeError.fsck
    public static let noSnapshot: Int32 = 43

    /// Every code a command can leave with, its original name and what it means here.
    public static let table: [(code: Int32, name: String, meaning: String)] = [
        (success, "", "success"),
        (failure, "SYSEXIT_CREAT", "any other failure (the message says what)"),
        (device, "SYSEXIT_DEVICE", "no such device, or no device backend usable here"),
        (deviceIoctl, "SYSEXIT_DEVIOC", "the device (kernel driver or simulator) refused a request"),
        (open, "SYSEXIT_OPEN", "a file cannot be opened or created (missing, no permission, not a file)"),
        (format, "SYSEXIT_PLOOPFMT", "not a valid image, or problems remain after check"),
        (system, "SYSEXIT_SYS", "a system call failed (the message names it and the file)"),
        (protocolError, "SYSEXIT_PROTOCOL", "a copy stream or the simulator's control protocol is broken"),
        (busy, "SYSEXIT_EBUSY", "busy: a device, balloon, disk or conversion operation is pending"),
        (fallocate, "SYSEXIT_FALLOCATE", "the balloon file cannot be given space"),
        (mount, "SYSEXIT_MOUNT", "mounting the file system failed"),
        (umount, "SYSEXIT_UMOUNT", "unmounting the file system failed"),
        (lock, "SYSEXIT_LOCK", "the disk or image is locked by another ploop process"),
        (mkfs, "SYSEXIT_MKFS", "making the file system failed"),
        (resizeFS, "SYSEXIT_RESIZE_FS", "resizing the file system failed"),
        (aborted, "SYSEXIT_ABORT", "the operation was aborted (dirty tracking)"),
        (partitionTable, "SYSEXIT_CHANGE_GPT", "the partition table cannot be read or changed"),
        (inUse, "SYSEXIT_PLOOPINUSE", "the image is marked in use, or the disk is running (unmount it)"),
        (param, "SYSEXIT_PARAM", "bad usage or a parameter the command refuses (the message says which)"),
        (descriptor, "SYSEXIT_DISKDESCR", "DiskDescriptor.xml is missing, unreadable or invalid"),
        (notMounted, "SYSEXIT_DEV_NOT_MOUNTED", "the disk is not running on any device"),
        (fsck, "SYSEXIT_FSCK", "the file system check left errors"),
        (noSnapshot, "SYSEXIT_NOSNAP", "no snapshot with that GUID"),
    ]

    /// The table as `ploop --help` prints it.
    static var helpText: String {
        table.map { row in
            let code = String(row.code)
            return String(repeating: " ", count: 4 - code.count) + code + "  " + row.meaning
        }.joined(separator: "\n")
    }

    /// The exit code for a library error (nil: not one this table knows).
    public static func of(_ error: any Error) -> Int32? {
        switch error {
        case let e as CommandFailure: e.code
        case let e as ImageError: of(e)
        case let e as DiskError: of(e)
        case let e as DeviceError: of(e)
        case let e as VolumeError: e.code
        case let e as BalloonProcedure.Failure: of(e)
        case let e as CopyStream.Error: of(e)
        case let e as CopySender.Failure:
            switch e { case .step(_, let inner): of(inner) ?? failure }
        case is SystemError: system
        case is SizeArgument.ParseError: param
        default: nil
        }
    }

    static func of(_ e: ImageError) -> Int32 {
        switch e {
        case .notFound, .isDirectory, .notRegularFile, .permissionDenied, .alreadyExists, .folderMissing, .notAFolder,
            .symlinkLoop, .nameTooLong, .readOnly:
            open
        case .io: system
        // A size the format's version cannot hold comes from the command line (init -v 1, grow);
        // a header with a zero or impossible size is a format error like any other.
        case .format(_, .sizeTooLarge): param
        case .format, .truncated, .notPloop1, .clusterSizeMismatch, .corrupt, .empty, .rawNeedsFormat, .fileTooLarge:
            format
        case .versionConverting: busy
        case .inUse: inUse
        case .locked: lock
        case .sameFile, .noSources, .shrinkRefused, .sizeNotClusterMultiple, .looksLikePloop1: param
        case .injectedCrash: failure
        }
    }

    static func of(_ e: DiskError) -> Int32 {
        switch e {
        case .noDescriptor, .unreadable, .malformed, .invalid: descriptor
        case .unknownGUID: noSnapshot
        case .badGUID, .guidExists, .alreadyExists, .refused: param
        case .locked: lock
        case .image(let i): of(i)
        case .mounted: inUse
        case .notMounted: notMounted
        case .io: system
        case .device(_, let d): of(d)
        case .stopped(_, _, _, let cause, _): of(cause)
        }
    }

    static func of(_ e: DeviceError) -> Int32 {
        switch e {
        case .busy, .wrongState, .deviceInUse, .heldOpen: busy
        case .aborted: aborted
        case .noSuchDevice, .unavailable, .badDeviceName: device
        case .notRunning: notMounted
        case .image(let i): of(i)
        case .system: deviceIoctl
        case .protocolMismatch: protocolError
        case .invalid, .notSupported, .outOfRange, .levelsOutOfRange, .notTopLevel, .unsuitableLevel, .cannotShrink,
            .sizeTooLarge, .notClusterMultiple, .invalidClusterSize, .noImages, .conflictingFlags, .readOnly:
            param
        case .again, .unreadExtents: failure
        }
    }

    static func of(_ e: CopyStream.Error) -> Int32 {
        switch e {
        case .badMarker, .recordTooLarge, .positionOutOfRange, .truncated, .feedback: protocolError
        case .destinationExists, .destinationNotRegular: open
        case .descriptorNotOpen: param
        case .io: system
        }
    }

    static func of(_ e: BalloonProcedure.Failure) -> Int32 {
        switch e {
        case .inUse: busy
        case .noSpace: param
        case .protocolError: protocolError
        case .fallocate: fallocate
        case .corrupt: format
        }
    }
}

extension CommandFailure {
    /// A library error in its own words, with the exit code the table gives it.
    init(_ error: any Error) {
        self.init("\(error)", code: ExitCodes.of(error) ?? ExitCodes.failure)
    }
}
