import CPloopSys
import Foundation
import PloopDevice
import PloopSystem

/// Where `KernelBackend`'s ioctls go: the real driver through `/dev/ploopN`, or a fake kernel in
/// tests that decodes the same bytes. Everything the backend knows of a device passes through
/// here or through the sysfs tree at `sysfsRoot`.
public protocol KernelTransport: Sendable {
    /// `/sys` on a real host.
    var sysfsRoot: String { get }
    /// One ioctl on device `index`: the driver's return value (>= 0) or -errno. `argument` is the
    /// argument memory as the kernel reads and writes it (nil for `_IO` requests), or for FBFILTER
    /// the value itself in the pointer's bits, as user space passes it.
    /// Throws only when the device cannot be reached at all (no module, no permission).
    func ioctl(device index: Int, request: UInt, argument: UnsafeMutableRawPointer?) throws(DeviceError) -> Int32
    /// Block I/O on the running device.
    func openIO(device index: Int) throws(DeviceError) -> any DeviceIO
}

/// The real driver: ioctls on `/dev/ploopN` (created with major 182, minor N×16 when missing, as
/// the manual says), sysfs under `/sys`.
public struct SystemTransport: KernelTransport {
    public static let major: UInt32 = 182
    public let sysfsRoot: String
    public let devRoot: String

    public init(sysfsRoot: String = "/sys", devRoot: String = "/dev") {
        self.sysfsRoot = sysfsRoot
        self.devRoot = devRoot
    }

    public func node(_ index: Int) -> String { "\(devRoot)/ploop\(index)" }

    /// Makes `/dev/ploopN` if it is missing; refuses a node that belongs to another driver.
    public func ensureNode(_ index: Int) throws(DeviceError) {
        let path = node(index)
        if let (maj, min) = BlockNode.numbers(path) {
            guard maj == Self.major, min == UInt32(DeviceName.minor(index)) else {
                throw .invalid("\(path) is the block device \(maj):\(min), not the ploop device \(Self.major):\(DeviceName.minor(index)): remove it, or stop what made it (the simulator links its nodes to loop devices)")
            }
            return
        }
        if let e = PathInfo.statError(path), e != ENOENT { throw .system("stat \(path)", errno: e) }
        if PathInfo.statError(path) == nil { throw .system("stat \(path)", errno: ENOTBLK) }
        do { try BlockNode.make(path, major: Self.major, minor: UInt32(DeviceName.minor(index)), permissions: 0o600) } catch {
            if error.code != .fileExists { throw KernelErrors.unreachable(path, errno: error.errno) }
        }
    }

    public func ioctl(device index: Int, request: UInt, argument: UnsafeMutableRawPointer?) throws(DeviceError) -> Int32 {
        try ensureNode(index)
        let path = node(index)
        let node: File
        do { node = try File(path: path, mode: .readOnly) } catch { throw KernelErrors.unreachable(path, errno: error.errno) }
        return node.control(request, argument)
    }

    public func openIO(device index: Int) throws(DeviceError) -> any DeviceIO {
        try BlockDeviceIO(device: node(index))
    }
}

/// Errors for a device that cannot be reached, shared by the transports and the backend.
enum KernelErrors {
    static func unreachable(_ path: String, errno e: Int32) -> DeviceError {
        switch e {
        case ENXIO, ENODEV:
            .unavailable("\(path): no driver answers (\(SystemError.words(e))): load the ploop kernel module ('modprobe ploop') or use --backend simulator")
        case EACCES, EPERM:
            .unavailable("\(path): permission denied: the kernel backend needs root on the host")
        default:
            .system("open \(path)", errno: e)
        }
    }
}
