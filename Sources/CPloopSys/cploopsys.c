#define _GNU_SOURCE
#include "cploopsys.h"
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/fiemap.h>

int cploop_o_direct(void) { return O_DIRECT; }

int cploop_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return fallocate(fd, mode, (off_t)offset, (off_t)length) == 0 ? 0 : -errno;
}

int64_t cploop_copy_file_range(int fd_in, int64_t *off_in, int fd_out, int64_t *off_out, uint64_t len) {
    loff_t in = *off_in, out = *off_out;
    ssize_t n = copy_file_range(fd_in, &in, fd_out, &out, (size_t)len, 0);
    if (n < 0) return -errno;
    *off_in = in;
    *off_out = out;
    return n;
}

int64_t cploop_seek_data_hole(int fd, int64_t offset, int hole) {
    off_t r = lseek(fd, (off_t)offset, hole ? SEEK_HOLE : SEEK_DATA);
    return r < 0 ? -errno : r;
}

int cploop_stat(const char *path, struct stat *st) { return stat(path, st) == 0 ? 0 : -errno; }

int cploop_fiemap(int fd, uint64_t start, uint64_t length, struct cploop_extent *out, uint32_t max, int32_t *last) {
    size_t size = sizeof(struct fiemap) + max * sizeof(struct fiemap_extent);
    struct fiemap *fm = calloc(1, size);
    if (!fm) return -ENOMEM;
    fm->fm_start = start;
    fm->fm_length = length;
    fm->fm_flags = FIEMAP_FLAG_SYNC;
    fm->fm_extent_count = max;
    if (ioctl(fd, FS_IOC_FIEMAP, fm) < 0) {
        int e = errno;
        free(fm);
        return -e;
    }
    *last = 0;
    for (uint32_t i = 0; i < fm->fm_mapped_extents; i++) {
        out[i].logical = fm->fm_extents[i].fe_logical;
        out[i].physical = fm->fm_extents[i].fe_physical;
        out[i].length = fm->fm_extents[i].fe_length;
        out[i].flags = fm->fm_extents[i].fe_flags;
        if (fm->fm_extents[i].fe_flags & FIEMAP_EXTENT_LAST) *last = 1;
    }
    int n = (int)fm->fm_mapped_extents;
    free(fm);
    return n;
}
