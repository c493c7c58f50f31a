#ifndef CPLOOP_DM_ABI_H
#define CPLOOP_DM_ABI_H
// The device-mapper ioctl ABI, straight from the kernel's uapi header: struct dm_ioctl and its
// payload structures as the kernel lays them out, and the request numbers built with the
// header's own macros (DM_DEV_CREATE ...). Swift builds and reads the buffers at these offsets;
// the golden tests hold the numbers written down independently.
#include <stdint.h>
#include <linux/dm-ioctl.h>

/// The commands, numbered as the header's DM_*_CMD enum.
enum cploop_dm_cmd {
    CPLOOP_DM_VERSION = DM_VERSION_CMD,
    CPLOOP_DM_REMOVE_ALL = DM_REMOVE_ALL_CMD,
    CPLOOP_DM_LIST_DEVICES = DM_LIST_DEVICES_CMD,
    CPLOOP_DM_DEV_CREATE = DM_DEV_CREATE_CMD,
    CPLOOP_DM_DEV_REMOVE = DM_DEV_REMOVE_CMD,
    CPLOOP_DM_DEV_RENAME = DM_DEV_RENAME_CMD,
    CPLOOP_DM_DEV_SUSPEND = DM_DEV_SUSPEND_CMD,
    CPLOOP_DM_DEV_STATUS = DM_DEV_STATUS_CMD,
    CPLOOP_DM_DEV_WAIT = DM_DEV_WAIT_CMD,
    CPLOOP_DM_TABLE_LOAD = DM_TABLE_LOAD_CMD,
    CPLOOP_DM_TABLE_CLEAR = DM_TABLE_CLEAR_CMD,
    CPLOOP_DM_TABLE_DEPS = DM_TABLE_DEPS_CMD,
    CPLOOP_DM_TABLE_STATUS = DM_TABLE_STATUS_CMD,
    CPLOOP_DM_LIST_VERSIONS = DM_LIST_VERSIONS_CMD,
    CPLOOP_DM_TARGET_MSG = DM_TARGET_MSG_CMD,
    CPLOOP_DM_DEV_SET_GEOMETRY = DM_DEV_SET_GEOMETRY_CMD,
};

/// The ioctl request number of a command (0 for an unknown one).
unsigned long cploop_dm_request(int cmd);

/// The interface version this header describes (major, minor, patch).
void cploop_dm_header_version(uint32_t out[3]);

/// Flags of dm_ioctl.flags, as the header defines them.
enum cploop_dm_flag {
    CPLOOP_DM_READONLY = DM_READONLY_FLAG,
    CPLOOP_DM_SUSPEND = DM_SUSPEND_FLAG,
    CPLOOP_DM_PERSISTENT_DEV = DM_PERSISTENT_DEV_FLAG,
    CPLOOP_DM_STATUS_TABLE = DM_STATUS_TABLE_FLAG,
    CPLOOP_DM_ACTIVE_PRESENT = DM_ACTIVE_PRESENT_FLAG,
    CPLOOP_DM_INACTIVE_PRESENT = DM_INACTIVE_PRESENT_FLAG,
    CPLOOP_DM_BUFFER_FULL = DM_BUFFER_FULL_FLAG,
    CPLOOP_DM_SKIP_LOCKFS = DM_SKIP_LOCKFS_FLAG,
    CPLOOP_DM_NOFLUSH = DM_NOFLUSH_FLAG,
    CPLOOP_DM_QUERY_INACTIVE_TABLE = DM_QUERY_INACTIVE_TABLE_FLAG,
    CPLOOP_DM_UEVENT_GENERATED = DM_UEVENT_GENERATED_FLAG,
    CPLOOP_DM_DATA_OUT = DM_DATA_OUT_FLAG,
};

#endif
