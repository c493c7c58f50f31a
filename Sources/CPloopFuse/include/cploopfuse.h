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
    /// Optional asynchronous path (Linux AIO on the image files' O_DIRECT descriptors): `op` holds
    /// a read (is_write 0) or a write (1, its data already copied into an aligned buffer) of size
    /// bytes at off. The callback either hands it to cploop_fuse_submit and returns 1 (the reply
    /// then comes from the completion thread, after `completed`), or returns 0 (the request takes
    /// the synchronous path above), or -errno (the request fails with it).
    int (*start)(void *ctx, void *op, int is_write, uint64_t size, uint64_t off);
    /// Called on the completion thread for each submitted op, before its reply: `token` as given
    /// to cploop_fuse_submit, `result` the bytes moved or -errno. Must not block on the I/O path.
    void (*completed)(void *ctx, void *token, int is_write, uint64_t pos, uint64_t size, int64_t result);
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
/// From within `start`: submits the op's I/O on `fd` (opened O_DIRECT) at `pos`; `token` comes back
/// in `completed`. 0, or -errno when nothing was submitted (then `start` returns 0 or -errno and
/// `completed` is not called).
int cploop_fuse_submit(void *op, int fd, uint64_t pos, void *token);
/// 1 if requests may take the asynchronous path (Linux AIO set up), else 0.
int cploop_fuse_is_async(struct cploop_fuse *f);
/// Reads and writes answered so far: asynchronously, and synchronously.
void cploop_fuse_served(struct cploop_fuse *f, uint64_t *async, uint64_t *sync);
/// Asks the loop to return.
void cploop_fuse_exit(struct cploop_fuse *f);
/// Tells the kernel the file's size (attributes) changed.
int cploop_fuse_invalidate(struct cploop_fuse *f);
/// Unmounts (if still mounted) and frees.
void cploop_fuse_destroy(struct cploop_fuse *f);

#endif
