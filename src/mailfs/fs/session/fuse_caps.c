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
 *
 * And it lets a restarted daemon take over the FUSE connection of a crashed one
 * (ARCHITECTURE.md, "A restarted daemon takes over its mount's connection"). The kernel
 * sends INIT once per connection; a libfuse session on an adopted descriptor answers
 * nothing before it has seen one. So this library keeps a copy of the kernel's INIT as
 * it went through fuse_session_process_buf (mailfs stores it beside its state), and
 * replays that copy into the new session. libfuse's answer to the replay fails with
 * ENOENT (the kernel waits for no such request), which libfuse ignores.
 */
#define FUSE_USE_VERSION 34
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <stdint.h>
#include <string.h>

#define FH_APPENDING (UINT64_C(1) << 62)
#define FUSE_INIT_OPCODE 26
/* fuse_in_header: len (4), opcode (4), unique, nodeid (8 each), uid, gid, pid (4 each)... */
#define IN_HEADER_SIZE 40
#define INIT_COPY_MAX 256

typedef void (*process_buf_fn)(struct fuse_session *, const struct fuse_buf *);

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
static struct fuse_session *wrapped_session;
static unsigned char init_copy[INIT_COPY_MAX];
static size_t init_copy_size;
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
    wrapped_session = libfuse_session_new(args, &wrapped_ops, op_size, userdata);
    return wrapped_session;
}

static process_buf_fn libfuse_process_buf(void)
{
    static process_buf_fn found;
    if (!found) {
        void *libfuse = dlopen("libfuse3.so.3", RTLD_LAZY | RTLD_NOLOAD);
        if (libfuse)
            found = (process_buf_fn)dlvsym(libfuse, "fuse_session_process_buf", "FUSE_3.0");
    }
    return found;
}

static void copy_if_init(const struct fuse_buf *buf)
{
    uint32_t opcode;
    if (init_copy_size || (buf->flags & FUSE_BUF_IS_FD) || buf->size < IN_HEADER_SIZE
        || buf->size > INIT_COPY_MAX)
        return;
    memcpy(&opcode, (const char *)buf->mem + 4, sizeof(opcode));
    if (opcode != FUSE_INIT_OPCODE)
        return;
    memcpy(init_copy, buf->mem, buf->size);
    init_copy_size = buf->size;
}

void fuse_session_process_buf(struct fuse_session *se, const struct fuse_buf *buf)
{
    process_buf_fn process = libfuse_process_buf();
    if (se == wrapped_session)
        copy_if_init(buf);
    if (process)
        process(se, buf);
}

/* The kernel's INIT of this connection: its size, copied into `out` if it fits. */
size_t mailfs_init_request(unsigned char *out, size_t room)
{
    if (init_copy_size && init_copy_size <= room)
        memcpy(out, init_copy, init_copy_size);
    return init_copy_size;
}

/* Feed an earlier connection's INIT to this session (one on an adopted descriptor). */
int mailfs_replay_init(const unsigned char *request, size_t size)
{
    static unsigned char copy[INIT_COPY_MAX];
    struct fuse_buf buf;
    uint32_t opcode;
    process_buf_fn process = libfuse_process_buf();
    if (!process || !wrapped_session)
        return -ENOSYS;
    if (size < IN_HEADER_SIZE || size > INIT_COPY_MAX)
        return -EINVAL;
    memcpy(&opcode, request + 4, sizeof(opcode));
    if (opcode != FUSE_INIT_OPCODE)
        return -EINVAL;
    memcpy(copy, request, size);
    memset(&buf, 0, sizeof(buf));
    buf.size = size;
    buf.mem = copy;
    buf.fd = -1;
    process(wrapped_session, &buf);
    return caps.init_seen ? 0 : -EPROTO;
}
