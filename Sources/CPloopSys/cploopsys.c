#define _GNU_SOURCE
#include "cploopsys.h"
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

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
