/*
 * Lets mailfs choose the FUSE capabilities that pyfuse3 leaves at libfuse's defaults.
 *
 * Why: libfuse turns FUSE_CAP_AUTO_INVAL_DATA on by default, and pyfuse3 (3.5) offers no
 * way to turn it off. With it on, every write makes the kernel drop the page it just
 * wrote and fetch it again on the next read, at about one READ and one GETATTR per IMAP
 * operation. mailfs sees every change to index files and invalidates the kernel's cache
 * itself after a peer's change, so it does not need the kernel to guess.
 *
 * How: this library defines fuse_session_new(). Loaded with RTLD_GLOBAL before the
 * pyfuse3 extension, it is the definition pyfuse3's call binds to. It copies the lowlevel
 * operations, wraps their init callback and calls libfuse's own fuse_session_new. libfuse
 * calls init after setting its defaults and before building the INIT reply from
 * conn->want, so clearing the bit there is what the kernel gets. Only libfuse's public
 * API is used; an operations table larger than this build knows is passed through
 * untouched (and status says so).
 *
 * It also tells mailfs whether each write is an append. pyfuse3 passes a write handler
 * only the file handle and the offset, not the open file's current flags, and those can
 * change after open: Dovecot drops O_APPEND with fcntl(F_SETFL) to write indexid=0 into
 * a corrupted transaction log's header. The wrapper sets FH_APPENDING in the handle
 * number of every write whose file has O_APPEND at that moment (libfuse fills fi->flags
 * from the kernel's WRITE request), and mailfs takes the bit off again.
 */
#define FUSE_USE_VERSION 34
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <stdint.h>
#include <string.h>

#define FH_APPENDING (UINT64_C(1) << 62)

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *, size_t,
                                               void *);

struct mailfs_fuse_caps {
    int interposed;      /* our fuse_session_new wrapped the session */
    int init_seen;       /* the kernel's INIT went through our wrapper */
    unsigned capable;    /* what the kernel offered */
    unsigned want;       /* what was asked for, after our changes */
    int writes_tagged;   /* writes carry FH_APPENDING */
};

static struct mailfs_fuse_caps caps;
static unsigned clear_want;
static struct fuse_lowlevel_ops wrapped_ops;
static void (*filesystem_init)(void *, struct fuse_conn_info *);
static void (*filesystem_write)(fuse_req_t, fuse_ino_t, const char *, size_t, off_t,
                                struct fuse_file_info *);
static void (*filesystem_write_buf)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t,
                                    struct fuse_file_info *);

uint64_t mailfs_fh_appending(void) { return FH_APPENDING; }

void mailfs_fuse_caps_clear(unsigned flags) { clear_want = flags; }

const struct mailfs_fuse_caps *mailfs_fuse_caps_status(void) { return &caps; }

static void init_then_clear(void *userdata, struct fuse_conn_info *conn)
{
    if (filesystem_init)
        filesystem_init(userdata, conn);
    conn->want &= ~clear_want;
    caps.init_seen = 1;
    caps.capable = conn->capable;
    caps.want = conn->want;
}

static void tag_appending(struct fuse_file_info *fi)
{
    if (fi->flags & O_APPEND)
        fi->fh |= FH_APPENDING;
}

static void write_tagged(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
                         off_t off, struct fuse_file_info *fi)
{
    tag_appending(fi);
    filesystem_write(req, ino, buf, size, off, fi);
}

static void write_buf_tagged(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv,
                             off_t off, struct fuse_file_info *fi)
{
    tag_appending(fi);
    filesystem_write_buf(req, ino, bufv, off, fi);
}

struct fuse_session *fuse_session_new(struct fuse_args *args,
                                      const struct fuse_lowlevel_ops *op, size_t op_size,
                                      void *userdata)
{
    static session_new_fn libfuse_session_new;
    if (!libfuse_session_new) {
        void *libfuse = dlopen("libfuse3.so.3", RTLD_LAZY | RTLD_NOLOAD);
        if (!libfuse)
            libfuse = dlopen("libfuse3.so.3", RTLD_LAZY);
        if (libfuse)
            libfuse_session_new = (session_new_fn)dlvsym(libfuse, "fuse_session_new",
                                                         "FUSE_3.0");
        if (!libfuse_session_new)
            return NULL;
    }
    if (op_size > sizeof(wrapped_ops))
        return libfuse_session_new(args, op, op_size, userdata);
    memset(&wrapped_ops, 0, sizeof(wrapped_ops));
    memcpy(&wrapped_ops, op, op_size);
    filesystem_init = wrapped_ops.init;
    wrapped_ops.init = init_then_clear;
    filesystem_write = wrapped_ops.write;
    filesystem_write_buf = wrapped_ops.write_buf;
    if (filesystem_write)
        wrapped_ops.write = write_tagged;
    if (filesystem_write_buf)
        wrapped_ops.write_buf = write_buf_tagged;
    caps.writes_tagged = 1;
    caps.interposed = 1;
    return libfuse_session_new(args, &wrapped_ops, op_size, userdata);
}
