#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include "cploopfuse.h"
#include <fuse_lowlevel.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <fcntl.h>
#include <stdio.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <sys/syscall.h>
#include <linux/aio_abi.h>

/// One request on the asynchronous path: its iocb, the request to answer and an aligned buffer
/// (kept in a pool: an allocation per request would cost more than the request).
struct aio_op {
    struct iocb iocb;
    struct cploop_fuse *f;
    fuse_req_t req;
    void *buf;
    size_t cap;
    size_t size;
    uint64_t pos;
    void *token;
    int is_write;
    struct aio_op *next;
};

/// Buffers of the two pool classes: small requests (4 KiB random I/O) and up to max_write.
#define AIO_SMALL (128u << 10)
#define AIO_LARGE (1u << 20)
#define AIO_KEEP_SMALL 64
#define AIO_KEEP_LARGE 8
/// Requests in flight at once: the kernel sends at most max_background asynchronous requests
/// plus one per worker; past this io_submit says EAGAIN and the request is served synchronously.
#define AIO_DEPTH 256

struct cploop_fuse {
    struct fuse_session *se;
    struct cploop_fuse_callbacks cb;
    /// Largest read answered by splice: libfuse needs a pipe holding the reply header and the
    /// data, or it falls back to a fresh buffer per reply (slower than our copy).
    size_t splice_max;
    /// The asynchronous path (on unless PLOOP_FUSE_ASYNC=0 or the callbacks lack `start`).
    int async;
    /// Largest read taken asynchronously (larger ones are spliced); PLOOP_FUSE_ASYNC_READ_MAX.
    size_t async_read_max;
    aio_context_t aio;
    pthread_t completer;
    atomic_int inflight;
    atomic_int stopping;
    /// Reads and writes answered so far, asynchronously and synchronously (for the log).
    atomic_ullong served_async, served_sync;
    pthread_mutex_t pool_lock;
    struct aio_op *pool_small, *pool_large;
    int pool_small_n, pool_large_n;
};

/// Pipes grow past /proc/sys/fs/pipe-max-size only with CAP_SYS_RESOURCE.
static size_t splice_limit(void) {
    int p[2];
    if (pipe(p) != 0) return 0;
    size_t limit = (size_t)-1;
    if (fcntl(p[0], F_SETPIPE_SZ, 4 << 20) < 0) {
        limit = 0;
        FILE *m = fopen("/proc/sys/fs/pipe-max-size", "r");
        unsigned long max = 0;
        if (m) {
            if (fscanf(m, "%lu", &max) == 1 && max > 4096) limit = max - 4096;
            fclose(m);
        }
    }
    close(p[0]);
    close(p[1]);
    return limit;
}

static struct cploop_fuse *F(fuse_req_t req) { return fuse_req_userdata(req); }

static void fill_attr(struct cploop_fuse *f, struct stat *st) {
    memset(st, 0, sizeof(*st));
    st->st_ino = FUSE_ROOT_ID;
    st->st_mode = S_IFREG | 0600;
    st->st_nlink = 1;
    st->st_size = (off_t)f->cb.size(f->cb.ctx);
    st->st_blksize = 4096;
    st->st_blocks = st->st_size / 512;
}

static void op_init(void *userdata, struct fuse_conn_info *conn) {
    (void)userdata;
    // Large requests: the kernel caps them at max_pages (1 MiB here).
    conn->max_write = 1 << 20;
    conn->max_readahead = 1 << 20;
    conn->max_background = 64;
    conn->congestion_threshold = 48;
    if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
    // Reads answered from the image files are spliced into /dev/fuse (no copy through us).
    const char *splice = getenv("PLOOP_FUSE_SPLICE");
    if ((conn->capable & FUSE_CAP_SPLICE_WRITE) && !(splice && splice[0] == '0')) conn->want |= FUSE_CAP_SPLICE_WRITE;
    // No page cache of our own under loop: the device's data lives in the model.
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    struct stat st;
    if (ino != FUSE_ROOT_ID) { fuse_reply_err(req, ENOENT); return; }
    fill_attr(F(req), &st);
    // A long timeout: with 0 the kernel asks for the attributes before every direct read (half of
    // all requests). A grow invalidates them explicitly (cploop_fuse_invalidate) before loop
    // re-reads the size.
    fuse_reply_attr(req, &st, 3600.0);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
    (void)attr; (void)fi;
    struct stat st;
    if (to_set & FUSE_SET_ATTR_SIZE) { fuse_reply_err(req, EPERM); return; }
    fill_attr(F(req), &st);
    (void)ino;
    fuse_reply_attr(req, &st, 3600.0);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    (void)parent; (void)name;
    fuse_reply_err(req, ENOENT);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    fi->keep_cache = 0;
    fuse_reply_open(req, fi);
}

/// One read buffer per worker thread, kept: a fresh 1 MiB allocation per request is an mmap, 256
/// page faults and an munmap (glibc serves large blocks that way).
static __thread void *read_buf;
static __thread size_t read_buf_size;

static void *thread_buffer(size_t size) {
    if (size > read_buf_size) {
        free(read_buf);
        read_buf = NULL;
        read_buf_size = 0;
        size_t want = size < (1 << 20) ? (1 << 20) : size;
        if (posix_memalign(&read_buf, 4096, want) != 0) return NULL;
        read_buf_size = want;
    }
    return read_buf;
}

// MARK: - The asynchronous path

static long sys_io_setup(unsigned nr, aio_context_t *ctx) { return syscall(SYS_io_setup, nr, ctx); }
static long sys_io_destroy(aio_context_t ctx) { return syscall(SYS_io_destroy, ctx); }
static long sys_io_submit(aio_context_t ctx, long n, struct iocb **list) { return syscall(SYS_io_submit, ctx, n, list); }
static long sys_io_getevents(aio_context_t ctx, long min, long max, struct io_event *ev, struct timespec *ts) {
    return syscall(SYS_io_getevents, ctx, min, max, ev, ts);
}

/// An op whose buffer holds `size` bytes, from the pool or new; NULL past AIO_LARGE or without memory.
static struct aio_op *op_get(struct cploop_fuse *f, size_t size) {
    if (size == 0 || size > AIO_LARGE) return NULL;
    int large = size > AIO_SMALL;
    pthread_mutex_lock(&f->pool_lock);
    struct aio_op **head = large ? &f->pool_large : &f->pool_small;
    struct aio_op *op = *head;
    if (op) {
        *head = op->next;
        if (large) f->pool_large_n--; else f->pool_small_n--;
    }
    pthread_mutex_unlock(&f->pool_lock);
    if (!op) {
        op = calloc(1, sizeof(*op));
        if (!op) return NULL;
        op->cap = large ? AIO_LARGE : AIO_SMALL;
        if (posix_memalign(&op->buf, 4096, op->cap) != 0) { free(op); return NULL; }
    }
    op->f = f;
    op->size = size;
    op->next = NULL;
    return op;
}

static void op_put(struct cploop_fuse *f, struct aio_op *op) {
    int large = op->cap > AIO_SMALL;
    pthread_mutex_lock(&f->pool_lock);
    int keep = large ? f->pool_large_n < AIO_KEEP_LARGE : f->pool_small_n < AIO_KEEP_SMALL;
    if (keep) {
        struct aio_op **head = large ? &f->pool_large : &f->pool_small;
        op->next = *head;
        *head = op;
        if (large) f->pool_large_n++; else f->pool_small_n++;
    }
    pthread_mutex_unlock(&f->pool_lock);
    if (!keep) { free(op->buf); free(op); }
}

static void pool_free(struct aio_op *op) {
    while (op) {
        struct aio_op *next = op->next;
        free(op->buf);
        free(op);
        op = next;
    }
}

int cploop_fuse_submit(void *opp, int fd, uint64_t pos, void *token) {
    struct aio_op *op = opp;
    struct cploop_fuse *f = op->f;
    memset(&op->iocb, 0, sizeof(op->iocb));
    op->iocb.aio_data = (uint64_t)(uintptr_t)op;
    op->iocb.aio_lio_opcode = op->is_write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
    op->iocb.aio_fildes = (uint32_t)fd;
    op->iocb.aio_buf = (uint64_t)(uintptr_t)op->buf;
    op->iocb.aio_nbytes = op->size;
    op->iocb.aio_offset = (int64_t)pos;
    op->pos = pos;
    op->token = token;
    atomic_fetch_add(&f->inflight, 1);
    struct iocb *list[1] = { &op->iocb };
    // From here on the op belongs to the completion thread.
    long r = sys_io_submit(f->aio, 1, list);
    if (r == 1) return 0;
    int e = r < 0 ? errno : EAGAIN;
    atomic_fetch_sub(&f->inflight, 1);
    return -e;
}

/// Ends one op: a short read is the end of the file (zeros past it, as the synchronous path
/// reads), a short write is finished synchronously; the model hears of it, then the kernel.
static void op_finish(struct cploop_fuse *f, struct aio_op *op, int64_t res) {
    if (res >= 0 && (size_t)res < op->size) {
        if (op->is_write) {
            size_t done = (size_t)res;
            while (done < op->size) {
                ssize_t w = pwrite((int)op->iocb.aio_fildes, (char *)op->buf + done, op->size - done, (off_t)(op->pos + done));
                if (w < 0 && errno == EINTR) continue;
                if (w <= 0) { res = w < 0 ? -errno : -EIO; break; }
                done += (size_t)w;
            }
            if (done == op->size) res = (int64_t)op->size;
        } else {
            memset((char *)op->buf + res, 0, op->size - (size_t)res);
            res = (int64_t)op->size;
        }
    }
    f->cb.completed(f->cb.ctx, op->token, op->is_write, op->pos, op->size, res);
    if (res < 0) fuse_reply_err(op->req, (int)-res);
    else if (op->is_write) fuse_reply_write(op->req, op->size);
    else fuse_reply_buf(op->req, op->buf, op->size);
    op_put(f, op);
    atomic_fetch_sub(&f->inflight, 1);
}

/// Reaps completions and answers them, a batch per wake-up, until told to stop with nothing
/// left in flight.
static void *completer_main(void *arg) {
    struct cploop_fuse *f = arg;
    struct io_event ev[64];
    for (;;) {
        struct timespec ts = { 0, 100 * 1000 * 1000 };
        long n = sys_io_getevents(f->aio, 1, 64, ev, &ts);
        if (n < 0 && errno != EINTR) {
            // Cannot happen with a live context; say it and let teardown wait no more.
            fprintf(stderr, "ploop: io_getevents: %s\n", strerror(errno));
            break;
        }
        for (long i = 0; i < n; i++) op_finish(f, (struct aio_op *)(uintptr_t)ev[i].data, ev[i].res);
        if (n <= 0 && atomic_load(&f->stopping) && atomic_load(&f->inflight) == 0) break;
    }
    return NULL;
}

/// Sets up the asynchronous path; without Linux AIO every request is served synchronously.
static void async_start(struct cploop_fuse *f) {
    const char *on = getenv("PLOOP_FUSE_ASYNC");
    if (!f->cb.start || !f->cb.completed || (on && on[0] == '0')) return;
    const char *max = getenv("PLOOP_FUSE_ASYNC_READ_MAX");
    f->async_read_max = max ? strtoul(max, NULL, 0) : AIO_SMALL;
    if (f->async_read_max > AIO_LARGE) f->async_read_max = AIO_LARGE;
    pthread_mutex_init(&f->pool_lock, NULL);
    if (sys_io_setup(AIO_DEPTH, &f->aio) != 0) {
        fprintf(stderr, "ploop: no Linux AIO (%s): requests are served synchronously\n", strerror(errno));
        return;
    }
    if (pthread_create(&f->completer, NULL, completer_main, f) != 0) {
        sys_io_destroy(f->aio);
        return;
    }
    f->async = 1;
}

/// Waits for every op in flight, stops the completion thread and frees the pool.
static void async_stop(struct cploop_fuse *f) {
    if (!f->async) return;
    atomic_store(&f->stopping, 1);
    pthread_join(f->completer, NULL);
    sys_io_destroy(f->aio);
    pool_free(f->pool_small);
    pool_free(f->pool_large);
    pthread_mutex_destroy(&f->pool_lock);
    f->async = 0;
}

/// Offers a request to the asynchronous path: 1 taken (answered later), 0 not taken (*opp holds
/// the op for a synchronous write, or NULL), or -errno.
static int async_offer(struct cploop_fuse *f, fuse_req_t req, int is_write, const void *data, size_t size, off_t off, struct aio_op **opp) {
    *opp = NULL;
    if (!f->async || (!is_write && size > f->async_read_max)) return 0;
    struct aio_op *op = op_get(f, size);
    if (!op) return 0;
    op->req = req;
    op->is_write = is_write;
    if (is_write) memcpy(op->buf, data, size);
    int r = f->cb.start(f->cb.ctx, op, is_write, size, (uint64_t)off);
    if (r == 1) return 1;
    if (r == 0 && is_write) { *opp = op; return 0; }
    op_put(f, op);
    return r;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    struct cploop_fuse *f = F(req);
    uint64_t end = f->cb.size(f->cb.ctx);
    if ((uint64_t)off >= end) { fuse_reply_buf(req, NULL, 0); return; }
    if ((uint64_t)off + size > end) size = end - (uint64_t)off;
    struct aio_op *op;
    int a = async_offer(f, req, 0, NULL, size, off, &op);
    if (a == 1) { atomic_fetch_add_explicit(&f->served_async, 1, memory_order_relaxed); return; }
    if (a < 0) { fuse_reply_err(req, -a); return; }
    atomic_fetch_add_explicit(&f->served_sync, 1, memory_order_relaxed);
    // libfuse splices only replies of two pages or more; below that it would copy through a
    // buffer it allocates per reply, worse than ours.
    if (f->cb.read_direct && size >= 8192 && size <= f->splice_max) {
        int r = f->cb.read_direct(f->cb.ctx, req, size, (uint64_t)off);
        if (r == 1) return;
        if (r < 0) { fuse_reply_err(req, -r); return; }
    }
    void *buf = thread_buffer(size ? size : 1);
    if (!buf) { fuse_reply_err(req, ENOMEM); return; }
    int64_t n = f->cb.read(f->cb.ctx, buf, size, (uint64_t)off);
    if (n < 0) fuse_reply_err(req, (int)-n);
    else fuse_reply_buf(req, buf, (size_t)n);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    struct cploop_fuse *f = F(req);
    struct aio_op *op;
    int a = async_offer(f, req, 1, buf, size, off, &op);
    if (a == 1) { atomic_fetch_add_explicit(&f->served_async, 1, memory_order_relaxed); return; }
    if (a < 0) { fuse_reply_err(req, -a); return; }
    atomic_fetch_add_explicit(&f->served_sync, 1, memory_order_relaxed);
    // Not taken: written synchronously, from the op's aligned copy when there is one (no bounce).
    int64_t n = f->cb.write(f->cb.ctx, op ? op->buf : buf, size, (uint64_t)off);
    if (op) op_put(f, op);
    if (n < 0) fuse_reply_err(req, (int)-n);
    else fuse_reply_write(req, (size_t)n);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
    (void)ino; (void)datasync; (void)fi;
    struct cploop_fuse *f = F(req);
    int r = f->cb.flush(f->cb.ctx);
    fuse_reply_err(req, r < 0 ? -r : 0);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    struct cploop_fuse *f = F(req);
    int r = f->cb.fallocate(f->cb.ctx, mode, (uint64_t)off, (uint64_t)len);
    fuse_reply_err(req, r < 0 ? -r : 0);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    fuse_reply_err(req, 0);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = op_lookup,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .fsync = op_fsync,
    .release = op_release,
    .fallocate = op_fallocate,
};

struct cploop_fuse *cploop_fuse_mount(const char *mountpoint, const struct cploop_fuse_callbacks *cb, int *err) {
    char *argv[] = {"ploop", "-o", "fsname=ploop,subtype=ploop,allow_other,default_permissions", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, argv);
    struct cploop_fuse *f = calloc(1, sizeof(*f));
    if (!f) { *err = -ENOMEM; return NULL; }
    f->cb = *cb;
    const char *splice = getenv("PLOOP_FUSE_SPLICE");
    f->splice_max = (splice && splice[0] == '0') ? 0 : splice_limit();
    f->se = fuse_session_new(&args, &ops, sizeof(ops), f);
    if (!f->se) { free(f); *err = -EINVAL; return NULL; }
    if (fuse_session_mount(f->se, mountpoint) != 0) {
        fuse_session_destroy(f->se);
        free(f);
        *err = -EIO;
        return NULL;
    }
    async_start(f);
    *err = 0;
    return f;
}

int cploop_fuse_loop(struct cploop_fuse *f, int threads) {
    if (threads <= 1) return fuse_session_loop(f->se);
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    fuse_loop_cfg_set_clone_fd(cfg, 1);
    fuse_loop_cfg_set_max_threads(cfg, (unsigned)threads);
    // Keep every worker: letting idle ones exit makes libfuse start a thread for each burst.
    fuse_loop_cfg_set_idle_threads(cfg, (unsigned)threads);
    int r = fuse_session_loop_mt(f->se, cfg);
    fuse_loop_cfg_destroy(cfg);
    return r;
}

int cploop_fuse_reply_fd(void *req, int fd, uint64_t off, uint64_t size) {
    struct fuse_bufvec bv = FUSE_BUFVEC_INIT(size);
    bv.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    bv.buf[0].fd = fd;
    bv.buf[0].pos = (off_t)off;
    return fuse_reply_data((fuse_req_t)req, &bv, 0);
}

int cploop_fuse_is_async(struct cploop_fuse *f) { return f->async; }

void cploop_fuse_served(struct cploop_fuse *f, uint64_t *async, uint64_t *sync) {
    *async = atomic_load_explicit(&f->served_async, memory_order_relaxed);
    *sync = atomic_load_explicit(&f->served_sync, memory_order_relaxed);
}

void cploop_fuse_exit(struct cploop_fuse *f) { fuse_session_exit(f->se); }

int cploop_fuse_invalidate(struct cploop_fuse *f) {
    return fuse_lowlevel_notify_inval_inode(f->se, FUSE_ROOT_ID, -1, 0);
}

void cploop_fuse_destroy(struct cploop_fuse *f) {
    fuse_session_unmount(f->se);
    async_stop(f);
    fuse_session_destroy(f->se);
    free(f);
}
