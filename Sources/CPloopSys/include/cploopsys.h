#ifndef CPLOOPSYS_H
#define CPLOOPSYS_H
// Calls Swift cannot make directly (GNU extensions, name clashes). Each returns -errno on failure.
#include <sys/types.h>
#include <sys/stat.h>
#include <stdint.h>

/// open(2) flag O_DIRECT (a GNU extension Swift does not see).
int cploop_o_direct(void);
/// fallocate(2); returns 0 or -errno.
int cploop_fallocate(int fd, int mode, int64_t offset, int64_t length);
/// copy_file_range(2); returns bytes copied or -errno. Offsets are advanced.
int64_t cploop_copy_file_range(int fd_in, int64_t *off_in, int fd_out, int64_t *off_out, uint64_t len);
/// lseek(2) with SEEK_DATA (whence 0) or SEEK_HOLE (whence 1); returns the offset or -errno.
int64_t cploop_seek_data_hole(int fd, int64_t offset, int hole);
/// stat(2); returns 0 or -errno.
int cploop_stat(const char *path, struct stat *st);

/// One extent of a FIEMAP answer.
struct cploop_extent {
    uint64_t logical;
    uint64_t physical;
    uint64_t length;
    uint32_t flags;
};
/// FIEMAP of [start, start+length): fills up to `max` extents (FIEMAP_FLAG_SYNC), sets *last when
/// the final extent of the file was returned. Returns the count or -errno.
int cploop_fiemap(int fd, uint64_t start, uint64_t length, struct cploop_extent *out, uint32_t max, int32_t *last);

#endif
