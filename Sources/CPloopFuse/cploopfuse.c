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

struct cploop_fuse {
    struct fuse_session *se;
    struct cploop_fuse_callbacks cb;
    /// Largest read answered by splice: libfuse needs a pipe holding the reply header and the
    /// data, or it falls back to a fresh buffer per reply (slower than our copy).
    size_t splice_max;
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

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    struct cploop_fuse *f = F(req);
    uint64_t end = f->cb.size(f->cb.ctx);
    if ((uint64_t)off >= end) { fuse_reply_buf(req, NULL, 0); return; }
    if ((uint64_t)off + size > end) size = end - (uint64_t)off;
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
    int64_t n = f->cb.write(f->cb.ctx, buf, size, (uint64_t)off);
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

void cploop_fuse_exit(struct cploop_fuse *f) { fuse_session_exit(f->se); }

int cploop_fuse_invalidate(struct cploop_fuse *f) {
    return fuse_lowlevel_notify_inval_inode(f->se, FUSE_ROOT_ID, -1, 0);
}

void cploop_fuse_destroy(struct cploop_fuse *f) {
    fuse_session_unmount(f->se);
    fuse_session_destroy(f->se);
    free(f);
}
