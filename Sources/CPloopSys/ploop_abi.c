#include "ploop_abi.h"
#include <errno.h>
#include <sys/ioctl.h>

// struct ploop_xops of the kernel: a function table of pointers (kernel-internal use only).
struct cploop_xops { uint32_t magic; void *get_extent; };

unsigned long cploop_ioctl_number(int which) {
    switch (which) {
    case CPLOOP_IOC_ADD_DELTA: return _IOW(CPLOOP_IOC_MAGIC, 0, struct cploop_ctl);
    case CPLOOP_IOC_CLEAR: return _IO(CPLOOP_IOC_MAGIC, 1);
    case CPLOOP_IOC_STOP: return _IO(CPLOOP_IOC_MAGIC, 2);
    case CPLOOP_IOC_START: return _IO(CPLOOP_IOC_MAGIC, 3);
    case CPLOOP_IOC_SNAPSHOT: return _IOW(CPLOOP_IOC_MAGIC, 4, struct cploop_ctl);
    case CPLOOP_IOC_DEL_DELTA: return _IOW(CPLOOP_IOC_MAGIC, 5, uint32_t);
    case CPLOOP_IOC_TRACK_INIT: return _IOR(CPLOOP_IOC_MAGIC, 6, struct cploop_track_extent);
    case CPLOOP_IOC_TRACK_STOP: return _IO(CPLOOP_IOC_MAGIC, 7);
    case CPLOOP_IOC_TRACK_ABORT: return _IO(CPLOOP_IOC_MAGIC, 8);
    case CPLOOP_IOC_TRACK_SETPOS: return _IOW(CPLOOP_IOC_MAGIC, 9, uint64_t);
    case CPLOOP_IOC_TRACK_READ: return _IOR(CPLOOP_IOC_MAGIC, 10, struct cploop_track_extent);
    case CPLOOP_IOC_SYNC: return _IO(CPLOOP_IOC_MAGIC, 11);
    case CPLOOP_IOC_MERGE: return _IO(CPLOOP_IOC_MAGIC, 12);
    case CPLOOP_IOC_REPLACE_DELTA: return _IOW(CPLOOP_IOC_MAGIC, 13, struct cploop_ctl);
    case CPLOOP_IOC_TRUNCATE: return _IOW(CPLOOP_IOC_MAGIC, 14, struct cploop_truncate_ctl);
    case CPLOOP_IOC_INTERNAL: return _IOR(CPLOOP_IOC_MAGIC, 15, struct cploop_xops);
    case CPLOOP_IOC_UPDATE_INDEX: return _IOW(CPLOOP_IOC_MAGIC, 16, struct cploop_index_update_ctl);
    case CPLOOP_IOC_GROW: return _IOW(CPLOOP_IOC_MAGIC, 17, struct cploop_ctl);
    case CPLOOP_IOC_FBGET: return _IOW(CPLOOP_IOC_MAGIC, 18, struct cploop_freeblks_ctl);
    case CPLOOP_IOC_BALLOON: return _IOW(CPLOOP_IOC_MAGIC, 19, struct cploop_balloon_ctl);
    case CPLOOP_IOC_FREEBLKS: return _IOW(CPLOOP_IOC_MAGIC, 20, struct cploop_freeblks_ctl);
    case CPLOOP_IOC_RELOCBLKS: return _IOW(CPLOOP_IOC_MAGIC, 21, struct cploop_relocblks_ctl);
    case CPLOOP_IOC_GETDEVICE: return _IOW(CPLOOP_IOC_MAGIC, 22, struct cploop_getdevice_ctl);
    case CPLOOP_IOC_DISCARD_INIT: return _IO(CPLOOP_IOC_MAGIC, 23);
    case CPLOOP_IOC_DISCARD_FINI: return _IO(CPLOOP_IOC_MAGIC, 24);
    case CPLOOP_IOC_DISCARD_WAIT: return _IO(CPLOOP_IOC_MAGIC, 25);
    case CPLOOP_IOC_FBDROP: return _IO(CPLOOP_IOC_MAGIC, 26);
    case CPLOOP_IOC_FBFILTER: return _IOR(CPLOOP_IOC_MAGIC, 27, unsigned long);
    case CPLOOP_IOC_MAX_DELTA_SIZE: return _IOW(CPLOOP_IOC_MAGIC, 28, uint64_t);
    case CPLOOP_IOC_PUSH_BACKUP_INIT: return _IOR(CPLOOP_IOC_MAGIC, 29, struct cploop_push_backup_init_ctl);
    case CPLOOP_IOC_PUSH_BACKUP_IO: return _IOR(CPLOOP_IOC_MAGIC, 30, struct cploop_push_backup_init_ctl);
    case CPLOOP_IOC_PUSH_BACKUP_STOP: return _IOR(CPLOOP_IOC_MAGIC, 31, struct cploop_push_backup_init_ctl);
    case CPLOOP_IOC_FREEZE: return _IO(CPLOOP_IOC_MAGIC, 32);
    case CPLOOP_IOC_THAW: return _IO(CPLOOP_IOC_MAGIC, 33);
    default: return 0;
    }
}

int cploop_ioctl(int fd, unsigned long request, void *arg) {
    return ioctl(fd, request, arg) == 0 ? 0 : -errno;
}
