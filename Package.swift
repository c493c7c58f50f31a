// swift-tools-version: 6.1
import PackageDescription

let swiftSettings: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
]

// The commit the binary is built from, for `ploop --version` (nothing outside a git checkout).
let git = Context.gitInformation
let buildInfo: [CSetting] = [
    .define("PLOOP_GIT_COMMIT", to: "\"\(git?.currentCommit ?? "")\""),
    .define("PLOOP_GIT_DIRTY", to: git?.hasUncommittedChanges == true ? "1" : "0"),
]

let package = Package(
    name: "ploop",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "ploop", targets: ["ploop"]),
        .library(name: "PloopImage", targets: ["PloopImage"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.0"),
    ],
    targets: [
        // Pure values: header codec, BAT geometry, CHS, size parsing. No I/O.
        .target(name: "PloopFormat", exclude: ["README.md"], swiftSettings: swiftSettings),
        // C for what Swift cannot call: fallocate, copy_file_range, SEEK_DATA, FIEMAP, loop and ploop ioctls.
        .target(name: "CPloopSys", exclude: ["README.md"]),
        // The git commit and state of the checkout, from the manifest (see its README).
        .target(name: "CPloopBuild", exclude: ["README.md"], cSettings: buildInfo),
        // libfuse3 (pkg-config fuse3) and the small C file that speaks its low-level API.
        .systemLibrary(name: "CFuse3", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        .target(name: "CPloopFuse", dependencies: ["CFuse3"], exclude: ["README.md"]),
        .target(
            name: "PloopSystem", dependencies: ["CPloopSys", .product(name: "SystemPackage", package: "swift-system")], exclude: ["README.md"], swiftSettings: swiftSettings),
        // Deltas on files and the offline operations (init, merge, grow, check, info).
        .target(name: "PloopImage", dependencies: ["PloopFormat", "PloopSystem"], exclude: ["README.md"], swiftSettings: swiftSettings),
        // The model of the kernel device, the backend protocol, the in-process backend.
        .target(name: "PloopDevice", dependencies: ["PloopImage", "PloopFormat", "PloopSystem", "CPloopSys"], exclude: ["README.md"], swiftSettings: swiftSettings),
        // The FUSE + loop simulator: daemon, control protocol, SimulatorBackend.
        .target(
            name: "PloopSimulator",
            dependencies: ["PloopDevice", "PloopImage", "PloopSystem", "CPloopFuse", "CPloopSys", .product(name: "Logging", package: "swift-log")],
            exclude: ["README.md"], swiftSettings: swiftSettings),
        // The real kernel driver: KernelBackend over a transport seam (the device node, or a fake driver), sysfs.
        .target(name: "PloopKernel", dependencies: ["PloopDevice", "PloopImage", "PloopFormat", "PloopSystem", "CPloopSys"], exclude: ["README.md"], swiftSettings: swiftSettings),
        // Procedures written once against DeviceBackend.
        .target(
            name: "PloopBalloon", dependencies: ["PloopDevice", "PloopImage", "PloopFormat", "PloopSystem"],
            exclude: ["README.md"], swiftSettings: swiftSettings),
        .target(
            name: "PloopCopy", dependencies: ["PloopDevice", "PloopImage", "PloopFormat", "PloopSystem", "CPloopSys"],
            exclude: ["README.md"], swiftSettings: swiftSettings),
        // Disks as users manage them: DiskDescriptor.xml and its deltas, snapshots by GUID.
        .target(
            name: "PloopDisk", dependencies: ["PloopImage", "PloopFormat", "PloopSystem", "PloopDevice"],
            exclude: ["README.md"], swiftSettings: swiftSettings),
        // Disks with a file system: the GPT, the ext4 tools, mkfs, mount and resize of the partition.
        .target(
            name: "PloopVolume", dependencies: ["PloopDisk", "PloopDevice", "PloopImage", "PloopFormat", "PloopSystem", "CPloopSys"],
            exclude: ["README.md"], swiftSettings: swiftSettings),
        // Every subcommand, testable without spawning the binary.
        .target(
            name: "PloopCommands",
            dependencies: [
                "PloopImage", "PloopFormat", "PloopDevice", "PloopSimulator", "PloopKernel", "PloopBalloon", "PloopCopy", "PloopSystem", "CPloopSys", "CPloopBuild", "PloopDisk", "PloopVolume",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["README.md"], swiftSettings: swiftSettings
        ),
        .executableTarget(name: "ploop", dependencies: ["PloopCommands", "PloopSystem"], swiftSettings: swiftSettings),
        // Benchmarks of the engine in-process (scripts/bench runs it).
        .executableTarget(
            name: "ploop-bench", dependencies: ["PloopDevice", "PloopImage", "PloopFormat", "PloopSystem"],
            swiftSettings: swiftSettings),

        // The fuzz targets (parsers of untrusted bytes and their invariants), and the program that
        // replays them or, built by scripts/fuzz with -sanitize=fuzzer, runs libFuzzer on them.
        .target(
            name: "PloopFuzz", dependencies: ["PloopImage", "PloopFormat", "PloopDisk", "PloopCopy", "PloopDevice", "PloopSimulator"],
            exclude: ["README.md"], swiftSettings: swiftSettings),
        .executableTarget(name: "ploop-fuzz", dependencies: ["PloopFuzz"], swiftSettings: swiftSettings),

        .target(name: "PloopTestSupport", dependencies: ["PloopDevice", "PloopImage", "PloopSystem"], path: "Tests/PloopTestSupport", swiftSettings: swiftSettings),
        .testTarget(name: "PloopFormatTests", dependencies: ["PloopFormat"], swiftSettings: swiftSettings),
        .testTarget(name: "PloopImageTests", dependencies: ["PloopImage", "PloopFormat", "PloopSystem"], swiftSettings: swiftSettings),
        .testTarget(
            name: "PloopDeviceTests",
            dependencies: ["PloopDevice", "PloopSimulator", "PloopKernel", "PloopImage", "PloopFormat", "PloopSystem", "PloopTestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "PloopKernelTests", dependencies: ["PloopKernel", "PloopDevice", "PloopImage", "PloopFormat", "PloopCopy", "CPloopSys", "PloopTestSupport"],
            swiftSettings: swiftSettings),
        .testTarget(
            name: "PloopCopyTests", dependencies: ["PloopCopy", "PloopDevice", "PloopImage", "PloopFormat", "PloopTestSupport"], swiftSettings: swiftSettings),
        .testTarget(
            name: "PloopCommandsTests",
            dependencies: ["PloopCommands", "PloopImage", "PloopFormat", "PloopTestSupport", "PloopDisk", "PloopSystem", "PloopVolume", "PloopFuzz", "PloopCopy"],
            swiftSettings: swiftSettings
        ),
        // The real stack: the built `ploop` binary against qemu-img/qemu-io (and, later, FUSE/loop as root).
        .testTarget(
            name: "IntegrationTests",
            dependencies: ["PloopImage", "PloopFormat", "PloopSystem", "PloopTestSupport"],
            path: "IntegrationTests",
            swiftSettings: swiftSettings
        ),
    ]
)
