#ifndef PLOOP_ABI_H
#define PLOOP_ABI_H
// The legacy in-kernel ploop driver's ioctl ABI (include/linux/ploop/ploop_if.h of vzkernel, as
// user space v7.0.165 copies it): structures with the kernel's layout (aligned(8), x86-64) and
// the request numbers built with the kernel's own _IO/_IOW/_IOR macros. Flexible tails (chunks,
// extents) follow each fixed part directly.
#include <stdint.h>
#include <linux/ioctl.h>

#define CPLOOP_IOC_MAGIC 'P'

struct cploop_ctl_chunk {
    int32_t pctl_fd;
    uint32_t pctl_type;
    uint32_t pctl_flags;
    uint32_t pctl_offset;
    uint64_t pctl_start;
    uint64_t pctl_len;
};

struct cploop_ctl {
    uint32_t pctl_format;
    uint32_t pctl_flags;
    uint32_t pctl_cluster_log;
    uint32_t pctl_size;
    uint16_t pctl_chunks;
    uint8_t pctl_level;
    uint8_t mbz1;
    uint32_t mbz2;
} __attribute__((aligned(8)));

struct cploop_ctl_delta {
    struct cploop_ctl c;
    struct cploop_ctl_chunk f;
    char cookie[64];
};

struct cploop_truncate_ctl {
    int32_t fd;
    uint32_t alloc_head;
    uint8_t level;
    uint8_t mbz1;
    uint16_t mbz2;
} __attribute__((aligned(8)));

struct cploop_reloc_map {
    uint32_t req_cluster;
    uint32_t iblk;
};

struct cploop_index_update_ctl {
    uint32_t n_maps;
    uint8_t level;
    uint8_t mbz1;
    uint16_t mbz2;
} __attribute__((aligned(8)));

struct cploop_freeblks_ctl_extent {
    uint32_t clu;
    uint32_t iblk;
    uint32_t len;
} __attribute__((aligned(8)));

struct cploop_freeblks_ctl {
    uint32_t n_extents;
    uint32_t alloc_head;
    uint8_t level;
    uint8_t mbz1;
    uint16_t mbz2;
} __attribute__((aligned(8)));

struct cploop_relocblks_ctl_extent {
    uint32_t clu;
    uint32_t iblk;
    uint32_t len;
    uint32_t free;
};

struct cploop_relocblks_ctl {
    uint32_t n_extents;
    uint32_t n_scanned;
    uint32_t alloc_head;
    uint8_t level;
    uint8_t mbz1;
    uint16_t mbz2;
} __attribute__((aligned(8)));

struct cploop_balloon_ctl {
    uint32_t mntn_type;
    uint32_t alloc_head;
    uint8_t level;
    uint8_t inflate;
    uint8_t keep_intact;
    uint8_t mbz;
} __attribute__((aligned(8)));

struct cploop_getdevice_ctl {
    uint32_t minor;
    uint32_t mbz1;
} __attribute__((aligned(8)));

struct cploop_track_extent {
    uint64_t start;
    uint64_t end;
};

struct cploop_push_backup_init_ctl {
    uint8_t cbt_uuid[16];
    uint64_t cbt_mask_addr;
} __attribute__((aligned(8)));

/// The ioctls, in the kernel's numbering (nr 0..33).
enum cploop_ioctl {
    CPLOOP_IOC_ADD_DELTA = 0, CPLOOP_IOC_CLEAR, CPLOOP_IOC_STOP, CPLOOP_IOC_START, CPLOOP_IOC_SNAPSHOT,
    CPLOOP_IOC_DEL_DELTA, CPLOOP_IOC_TRACK_INIT, CPLOOP_IOC_TRACK_STOP, CPLOOP_IOC_TRACK_ABORT,
    CPLOOP_IOC_TRACK_SETPOS, CPLOOP_IOC_TRACK_READ, CPLOOP_IOC_SYNC, CPLOOP_IOC_MERGE,
    CPLOOP_IOC_REPLACE_DELTA, CPLOOP_IOC_TRUNCATE, CPLOOP_IOC_INTERNAL, CPLOOP_IOC_UPDATE_INDEX,
    CPLOOP_IOC_GROW, CPLOOP_IOC_FBGET, CPLOOP_IOC_BALLOON, CPLOOP_IOC_FREEBLKS, CPLOOP_IOC_RELOCBLKS,
    CPLOOP_IOC_GETDEVICE, CPLOOP_IOC_DISCARD_INIT, CPLOOP_IOC_DISCARD_FINI, CPLOOP_IOC_DISCARD_WAIT,
    CPLOOP_IOC_FBDROP, CPLOOP_IOC_FBFILTER, CPLOOP_IOC_MAX_DELTA_SIZE, CPLOOP_IOC_PUSH_BACKUP_INIT,
    CPLOOP_IOC_PUSH_BACKUP_IO, CPLOOP_IOC_PUSH_BACKUP_STOP, CPLOOP_IOC_FREEZE, CPLOOP_IOC_THAW,
    CPLOOP_IOC_COUNT
};

/// The request number of an ioctl (0 for an unknown one), built with _IO/_IOW/_IOR.
unsigned long cploop_ioctl_number(int which);
/// One ioctl on an open ploop device: 0 or -errno.
int cploop_ioctl(int fd, unsigned long request, void *arg);

#endif
