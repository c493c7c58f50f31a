#ifndef CPLOOPSYS_H
#define CPLOOPSYS_H
// Calls Swift cannot make directly (GNU extensions, name clashes). Each returns -errno on failure.
#include <sys/types.h>
#include <sys/stat.h>
#include <stdint.h>
#include <spawn.h>
#include "ploop_abi.h"
#include "dm_abi.h"

/// open(2) flag O_DIRECT (a GNU extension Swift does not see).
int cploop_o_direct(void);
/// A buffer of at least `size` bytes aligned to 4096, the calling thread's own (kept and reused
/// by its later calls: direct I/O from unaligned memory bounces through it without an allocation
/// per request). NULL when memory is short.
void *cploop_thread_scratch(size_t size);
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

/// LOOP_CTL_GET_FREE on /dev/loop-control: a free loop index, or -errno.
int cploop_loop_get_free(void);
/// LOOP_CONFIGURE of the loop device at `loopdev` over the window [offset, offset + sizelimit)
/// of `backing_fd` (0: to its end), partition scanning on; 0 or -errno.
int cploop_loop_configure_range(const char *loopdev, int backing_fd, int direct_io, int read_only, uint64_t offset, uint64_t sizelimit);
/// LOOP_CLR_FD; 0 or -errno.
int cploop_loop_clear(const char *loopdev);
/// LOOP_SET_STATUS64 with a new size limit (the rest as LOOP_GET_STATUS64 gave it); the kernel
/// announces the new capacity, also while the device is mounted.
int cploop_loop_set_sizelimit(const char *loopdev, uint64_t sizelimit);
/// LOOP_SET_CAPACITY (re-read the backing file's size); 0 or -errno.
int cploop_loop_set_capacity(const char *loopdev);
/// mknod(2) of a block device node; 0 or -errno.
int cploop_mknod_block(const char *path, unsigned major, unsigned minor, unsigned mode);
/// major/minor of a block device node; 0 or -errno.
/// BLKRRPART: the kernel reads the partition table again (EBUSY while a partition is in use).
int cploop_reread_partitions(const char *dev);
/// BLKPG: add (1), delete (2) or resize (3) partition `number` of a disk, in bytes; works while
/// other partitions (or, for resize, the partition itself) are mounted.
int cploop_blkpg_partition(const char *dev, int op, int number, uint64_t start, uint64_t length);
int cploop_block_numbers(const char *path, unsigned *major, unsigned *minor);
/// A listening Unix stream socket at `path` (removed first), mode 0600; fd or -errno.
int cploop_unix_listen(const char *path);
/// A connected Unix stream socket; fd or -errno.
int cploop_unix_connect(const char *path);
/// SO_PEERCRED of a connected Unix socket; 0 or -errno.
int cploop_peer_credentials(int fd, uint32_t *uid, int32_t *pid);
/// FIFREEZE / FITHAW on a mount point's fd; 0 or -errno.
int cploop_fifreeze(int fd);
int cploop_fithaw(int fd);

/// posix_spawn_file_actions_addchdir_np (a GNU extension Swift does not see): the child starts
/// in `path`; 0 or an errno.
int cploop_spawn_chdir(posix_spawn_file_actions_t *actions, const char *path);

/// BLKDISCARD of [off, off+len) on a block device; 0 or -errno.
int cploop_blkdiscard(int fd, uint64_t off, uint64_t len);

/// syncfs(2); 0 or -errno.
int cploop_syncfs(int fd);
/// Closes every file descriptor from `first` up (a daemon must not hold its starter's pipes).
void cploop_close_from(int first);

/// lstat(2) (the final symlink itself, not its target); 0 or -errno.
int cploop_lstat(const char *path, struct stat *st);
/// renameat2(2) with RENAME_NOREPLACE: fails with -EEXIST instead of replacing; 0 or -errno.
int cploop_rename_noreplace(const char *from, const char *to);
/// While set, SIGINT, SIGTERM and SIGHUP unlink `path` (a temporary file of ours) and then end
/// the process as the signal would. NULL clears it. Only async-signal-safe calls run in the
/// handler; the path is copied.
void cploop_unlink_on_signal(const char *path);

#endif
