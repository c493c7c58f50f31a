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
#include <linux/loop.h>
#include <linux/blkpg.h>
#include <sys/socket.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/syscall.h>
#include <signal.h>
#include <pthread.h>

int cploop_o_direct(void) { return O_DIRECT; }

static __thread void *scratch_buf;
static __thread size_t scratch_size;
/// Frees a thread's buffer when the thread ends (short-lived threads use it too).
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static void scratch_key_make(void) { (void)pthread_key_create(&scratch_key, free); }

void *cploop_thread_scratch(size_t size) {
    if (size > scratch_size) {
        free(scratch_buf);
        scratch_buf = NULL;
        scratch_size = 0;
        (void)pthread_once(&scratch_once, scratch_key_make);
        (void)pthread_setspecific(scratch_key, NULL);
        size_t want = size < (1 << 20) ? (1 << 20) : size;
        if (posix_memalign(&scratch_buf, 4096, want) != 0) { scratch_buf = NULL; return NULL; }
        scratch_size = want;
        (void)pthread_setspecific(scratch_key, scratch_buf);
    }
    return scratch_buf;
}

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

int cploop_loop_get_free(void) {
    int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (ctl < 0) return -errno;
    int n = ioctl(ctl, LOOP_CTL_GET_FREE);
    int e = errno;
    close(ctl);
    return n < 0 ? -e : n;
}

int cploop_loop_configure_range(const char *loopdev, int backing_fd, int direct_io, int read_only, uint64_t offset, uint64_t sizelimit) {
    int fd = open(loopdev, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct loop_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.fd = (unsigned)backing_fd;
    cfg.info.lo_offset = offset;
    cfg.info.lo_sizelimit = sizelimit;
    // Partition scanning on, as the ploop driver scans its devices: /dev/ploopNp1 needs it.
    cfg.info.lo_flags = (direct_io ? LO_FLAGS_DIRECT_IO : 0) | (read_only ? LO_FLAGS_READ_ONLY : 0) | LO_FLAGS_PARTSCAN;
    int r = ioctl(fd, LOOP_CONFIGURE, &cfg);
    int e = errno;
    close(fd);
    return r < 0 ? -e : 0;
}

/// One argument-less ioctl on a loop device node.
static int loop_ioctl(const char *loopdev, unsigned long request) {
    int fd = open(loopdev, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    int r = ioctl(fd, request, 0);
    int e = errno;
    close(fd);
    return r < 0 ? -e : 0;
}

int cploop_loop_set_sizelimit(const char *loopdev, uint64_t sizelimit) {
    int fd = open(loopdev, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct loop_info64 info;
    memset(&info, 0, sizeof(info));
    int r = ioctl(fd, LOOP_GET_STATUS64, &info);
    if (r == 0) {
        info.lo_sizelimit = sizelimit;
        r = ioctl(fd, LOOP_SET_STATUS64, &info);
    }
    int e = errno;
    close(fd);
    return r < 0 ? -e : 0;
}

int cploop_loop_clear(const char *loopdev) { return loop_ioctl(loopdev, LOOP_CLR_FD); }

int cploop_loop_set_capacity(const char *loopdev) { return loop_ioctl(loopdev, LOOP_SET_CAPACITY); }

int cploop_reread_partitions(const char *dev) {
    int fd = open(dev, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    int r = ioctl(fd, BLKRRPART, 0);
    int e = errno;
    close(fd);
    return r < 0 ? -e : 0;
}

int cploop_blkpg_partition(const char *dev, int op, int number, uint64_t start, uint64_t length) {
    int fd = open(dev, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct blkpg_partition part;
    memset(&part, 0, sizeof(part));
    part.pno = number;
    part.start = (long long)start;
    part.length = (long long)length;
    struct blkpg_ioctl_arg arg;
    memset(&arg, 0, sizeof(arg));
    arg.op = op;
    arg.datalen = sizeof(part);
    arg.data = &part;
    int r = ioctl(fd, BLKPG, &arg);
    int e = errno;
    close(fd);
    return r < 0 ? -e : 0;
}

int cploop_mknod_block(const char *path, unsigned major, unsigned minor, unsigned mode) {
    return mknod(path, S_IFBLK | mode, makedev(major, minor)) == 0 ? 0 : -errno;
}

int cploop_block_numbers(const char *path, unsigned *major, unsigned *minor) {
    struct stat st;
    if (stat(path, &st) != 0) return -errno;
    if (!S_ISBLK(st.st_mode)) return -ENOTBLK;
    *major = major(st.st_rdev);
    *minor = minor(st.st_rdev);
    return 0;
}

/// A new Unix stream socket and the address of `path`; fd or -errno.
static int unix_socket(const char *path, struct sockaddr_un *a) {
    if (strlen(path) >= sizeof(a->sun_path)) return -ENAMETOOLONG;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    memset(a, 0, sizeof(*a));
    a->sun_family = AF_UNIX;
    strcpy(a->sun_path, path);
    return fd;
}

int cploop_unix_listen(const char *path) {
    struct sockaddr_un a;
    int fd = unix_socket(path, &a);
    if (fd < 0) return fd;
    unlink(path);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 || chmod(path, 0600) != 0 || listen(fd, 16) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int cploop_unix_connect(const char *path) {
    struct sockaddr_un a;
    int fd = unix_socket(path, &a);
    if (fd < 0) return fd;
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int cploop_peer_credentials(int fd, uint32_t *uid, int32_t *pid) {
    struct ucred c;
    socklen_t len = sizeof(c);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c, &len) != 0) return -errno;
    *uid = c.uid;
    *pid = c.pid;
    return 0;
}

int cploop_fifreeze(int fd) { return ioctl(fd, FIFREEZE, 0) == 0 ? 0 : -errno; }
int cploop_fithaw(int fd) { return ioctl(fd, FITHAW, 0) == 0 ? 0 : -errno; }

void cploop_close_from(int first) {
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned)first, ~0U, 0) == 0) return;
#endif
    for (int fd = first; fd < 65536; fd++) close(fd);
}

int cploop_syncfs(int fd) { return syncfs(fd) == 0 ? 0 : -errno; }

int cploop_spawn_chdir(posix_spawn_file_actions_t *actions, const char *path) {
    return posix_spawn_file_actions_addchdir_np(actions, path);
}

int cploop_blkdiscard(int fd, uint64_t off, uint64_t len) {
    uint64_t range[2] = {off, len};
    return ioctl(fd, BLKDISCARD, &range) == 0 ? 0 : -errno;
}

int cploop_lstat(const char *path, struct stat *st) { return lstat(path, st) == 0 ? 0 : -errno; }

int cploop_rename_noreplace(const char *from, const char *to) {
    return syscall(SYS_renameat2, AT_FDCWD, from, AT_FDCWD, to, 1 /* RENAME_NOREPLACE */) == 0 ? 0 : -errno;
}

static char cleanup_path[4096];
static volatile sig_atomic_t cleanup_armed;

static void cleanup_handler(int sig) {
    if (cleanup_armed) unlink(cleanup_path);
    signal(sig, SIG_DFL);
    raise(sig);
}

void cploop_unlink_on_signal(const char *path) {
    cleanup_armed = 0;
    if (!path || strlen(path) >= sizeof(cleanup_path)) return;
    strcpy(cleanup_path, path);
    cleanup_armed = 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = cleanup_handler;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    // A mask inherited from whoever started us (runtimes spawn with signals blocked) must not
    // keep these signals pending forever.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}
