#include "dm_abi.h"
#include <sys/ioctl.h>

unsigned long cploop_dm_request(int cmd) {
    switch (cmd) {
    case DM_VERSION_CMD: return DM_VERSION;
    case DM_REMOVE_ALL_CMD: return DM_REMOVE_ALL;
    case DM_LIST_DEVICES_CMD: return DM_LIST_DEVICES;
    case DM_DEV_CREATE_CMD: return DM_DEV_CREATE;
    case DM_DEV_REMOVE_CMD: return DM_DEV_REMOVE;
    case DM_DEV_RENAME_CMD: return DM_DEV_RENAME;
    case DM_DEV_SUSPEND_CMD: return DM_DEV_SUSPEND;
    case DM_DEV_STATUS_CMD: return DM_DEV_STATUS;
    case DM_DEV_WAIT_CMD: return DM_DEV_WAIT;
    case DM_TABLE_LOAD_CMD: return DM_TABLE_LOAD;
    case DM_TABLE_CLEAR_CMD: return DM_TABLE_CLEAR;
    case DM_TABLE_DEPS_CMD: return DM_TABLE_DEPS;
    case DM_TABLE_STATUS_CMD: return DM_TABLE_STATUS;
    case DM_LIST_VERSIONS_CMD: return DM_LIST_VERSIONS;
    case DM_TARGET_MSG_CMD: return DM_TARGET_MSG;
    case DM_DEV_SET_GEOMETRY_CMD: return DM_DEV_SET_GEOMETRY;
    default: return 0;
    }
}

void cploop_dm_header_version(uint32_t out[3]) {
    out[0] = DM_VERSION_MAJOR;
    out[1] = DM_VERSION_MINOR;
    out[2] = DM_VERSION_PATCHLEVEL;
}
