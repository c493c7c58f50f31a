import PloopDevice

/// What can go wrong with the file system on a disk. Each says what happened and what to do;
/// `code` is the original's SYSEXIT_* value for it, so scripts see the same exit status.
public struct VolumeError: Error, CustomStringConvertible, Equatable {
    public var message: String
    public var code: Int32

    public init(_ message: String, code: Int32) {
        self.message = message
        self.code = code
    }

    public var description: String { message }

    public static let param: Int32 = 38
    public static let mount: Int32 = 21
    public static let umount: Int32 = 22
    public static let mkfs: Int32 = 24
    public static let resizeFS: Int32 = 26
    public static let changeGPT: Int32 = 33
    public static let fsck: Int32 = 41
    public static let device: Int32 = 2

    static func device(_ e: DeviceError) -> VolumeError { VolumeError(e.description, code: device) }
}
