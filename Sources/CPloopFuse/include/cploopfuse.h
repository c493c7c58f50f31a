#ifndef CPLOOPFUSE_H
#define CPLOOPFUSE_H
// Serves one regular file through libfuse3's low-level API. Every request is answered by the
// callbacks (the Swift daemon's device model); this file only speaks FUSE.
#include <stdint.h>
#include <stddef.h>

struct cploop_fuse_callbacks {
    void *ctx;
    /// Current size of the file in bytes.
    uint64_t (*size)(void *ctx);
    /// Fill buf with size bytes at off; return bytes or -errno.
    int64_t (*read)(void *ctx, void *buf, uint64_t size, uint64_t off);
    /// Optional: answer the read `req` straight from an image file with cploop_fuse_reply_fd
    /// (spliced, no copy through user space) and return 1; return 0 when the range cannot be served
    /// that way (then `read` is used), or -errno.
    int (*read_direct)(void *ctx, void *req, uint64_t size, uint64_t off);
    /// Write size bytes at off; return bytes or -errno.
    int64_t (*write)(void *ctx, const void *buf, uint64_t size, uint64_t off);
    /// Make every acknowledged write durable; 0 or -errno.
    int (*flush)(void *ctx);
    /// FUSE_FALLOCATE (PUNCH_HOLE / ZERO_RANGE with KEEP_SIZE); 0 or -errno.
    int (*fallocate)(void *ctx, int mode, uint64_t off, uint64_t len);
};

struct cploop_fuse;

/// Mounts a FUSE file system whose root is one regular file at `mountpoint` (an existing regular
/// file). Returns NULL and sets *err (-errno) on failure.
struct cploop_fuse *cploop_fuse_mount(const char *mountpoint, const struct cploop_fuse_callbacks *cb, int *err);
/// Serves requests until the file system is unmounted or cploop_fuse_exit is called.
/// threads <= 1: single-threaded loop; else a multi-threaded loop with clone_fd.
int cploop_fuse_loop(struct cploop_fuse *f, int threads);
/// Answers a read request with `size` bytes of file `fd` at `off` (spliced when the kernel allows);
/// 0 or -errno. Only from within read_direct.
int cploop_fuse_reply_fd(void *req, int fd, uint64_t off, uint64_t size);
/// Asks the loop to return.
void cploop_fuse_exit(struct cploop_fuse *f);
/// Tells the kernel the file's size (attributes) changed.
int cploop_fuse_invalidate(struct cploop_fuse *f);
/// Unmounts (if still mounted) and frees.
void cploop_fuse_destroy(struct cploop_fuse *f);

#endif
