/*
 * Sends the daemon's FUSE replies from a thread of their own.
 *
 * Why: the daemon serves every request on one Python thread, and that thread is the
 * bottleneck of a full overlay (one core at 100 %, the machine's other core partly idle).
 * Profiled under IMAP load, a quarter of that thread's time was the writev(2) of each
 * reply to /dev/fuse: the kernel ends the request there and wakes the process that made
 * it. Done on a thread that holds no GIL, that time moves to the other core, and the
 * Python thread goes on to the next request.
 *
 * How: like fuse_caps.c, this library is loaded with RTLD_GLOBAL before the pyfuse3
 * extension, so pyfuse3's calls to libfuse's fuse_reply_* functions bind to the ones
 * here. While offloading is on, each one copies what it was given (pyfuse3 frees its
 * buffers when the call returns) into a queue and returns 0; one sender thread takes the
 * queue in order and makes libfuse's own call. pyfuse3 only logs a failed reply, and
 * libfuse's answer to a reply that fails (a request interrupted meanwhile) is the same
 * in either thread.
 *
 * Order: replies leave in the order they were made, as before. A notification
 * (fuse_lowlevel_notify_*) must not overtake a reply made before it: an invalidation of
 * an entry that reached the kernel before the lookup reply that creates the entry would
 * be lost. So each notification first waits until every reply queued before it has been
 * written. Notifications come from worker threads (they can block in the kernel), never
 * from the sender, so that wait cannot deadlock; the sender itself never waits for
 * anything but its queue.
 *
 * Off by default; mailfs turns it on (config `reply_thread`) before the session starts,
 * and drains the queue before the session is destroyed (fuse_session_destroy here does).
 */
#define FUSE_USE_VERSION 34
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

enum reply_kind {
    REPLY_ERR,
    REPLY_ENTRY,
    REPLY_CREATE,
    REPLY_ATTR,
    REPLY_READLINK,
    REPLY_OPEN,
    REPLY_WRITE,
    REPLY_BUF,
    REPLY_STATFS,
    REPLY_XATTR,
    REPLY_POLL,
};

struct queued_reply {
    struct queued_reply *next;
    enum reply_kind kind;
    fuse_req_t req;
    union {
        int err;
        struct fuse_entry_param entry;
        struct {
            struct fuse_entry_param entry;
            struct fuse_file_info fi;
        } create;
        struct {
            struct stat attr;
            double timeout;
        } attr;
        struct fuse_file_info fi;
        size_t count;
        struct statvfs statfs;
        unsigned revents;
    } u;
    size_t size;
    char data[];
};

struct mailfs_reply_stats {
    uint64_t queued;      /* replies handed to the sender */
    uint64_t sent;        /* replies the sender has made */
    uint64_t failed;      /* of those, ones libfuse could not deliver */
    uint64_t direct;      /* replies made on the caller's thread (offloading off) */
    uint64_t wakeups;     /* times the sender was woken from an empty queue */
    uint64_t barriers;    /* notifications that waited for earlier replies */
    uint64_t max_backlog; /* most replies ever waiting at once */
    int running;
};

static struct mailfs_reply_stats stats;
static int offloading;
static int stopping;
static pthread_t sender;
static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_filled = PTHREAD_COND_INITIALIZER;
static pthread_cond_t queue_written = PTHREAD_COND_INITIALIZER;
static struct queued_reply *queue_head, *queue_tail;
static uint64_t backlog;
static int sender_idle;

static void *libfuse_symbol(const char *name)
{
    void *libfuse = dlopen("libfuse3.so.3", RTLD_LAZY | RTLD_NOLOAD);
    if (!libfuse)
        libfuse = dlopen("libfuse3.so.3", RTLD_LAZY);
    return libfuse ? dlvsym(libfuse, name, "FUSE_3.0") : NULL;
}

#define LIBFUSE(type, name)                                                        \
    static type libfuse_##name(void)                                               \
    {                                                                              \
        static type found;                                                         \
        if (!found)                                                                \
            found = (type)libfuse_symbol(#name);                                   \
        return found;                                                              \
    }

typedef int (*reply_err_fn)(fuse_req_t, int);
typedef int (*reply_entry_fn)(fuse_req_t, const struct fuse_entry_param *);
typedef int (*reply_create_fn)(fuse_req_t, const struct fuse_entry_param *,
                               const struct fuse_file_info *);
typedef int (*reply_attr_fn)(fuse_req_t, const struct stat *, double);
typedef int (*reply_readlink_fn)(fuse_req_t, const char *);
typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);
typedef int (*reply_count_fn)(fuse_req_t, size_t);
typedef int (*reply_buf_fn)(fuse_req_t, const char *, size_t);
typedef int (*reply_statfs_fn)(fuse_req_t, const struct statvfs *);
typedef int (*reply_poll_fn)(fuse_req_t, unsigned);
typedef int (*notify_inval_inode_fn)(struct fuse_session *, fuse_ino_t, off_t, off_t);
typedef int (*notify_inval_entry_fn)(struct fuse_session *, fuse_ino_t, const char *,
                                     size_t);
typedef int (*notify_delete_fn)(struct fuse_session *, fuse_ino_t, fuse_ino_t,
                                const char *, size_t);
typedef int (*notify_store_fn)(struct fuse_session *, fuse_ino_t, off_t,
                               struct fuse_bufvec *, enum fuse_buf_copy_flags);
typedef int (*notify_poll_fn)(struct fuse_pollhandle *);
typedef void (*session_destroy_fn)(struct fuse_session *);

LIBFUSE(reply_err_fn, fuse_reply_err)
LIBFUSE(reply_entry_fn, fuse_reply_entry)
LIBFUSE(reply_create_fn, fuse_reply_create)
LIBFUSE(reply_attr_fn, fuse_reply_attr)
LIBFUSE(reply_readlink_fn, fuse_reply_readlink)
LIBFUSE(reply_open_fn, fuse_reply_open)
LIBFUSE(reply_count_fn, fuse_reply_write)
LIBFUSE(reply_buf_fn, fuse_reply_buf)
LIBFUSE(reply_statfs_fn, fuse_reply_statfs)
LIBFUSE(reply_count_fn, fuse_reply_xattr)
LIBFUSE(reply_poll_fn, fuse_reply_poll)
LIBFUSE(notify_inval_inode_fn, fuse_lowlevel_notify_inval_inode)
LIBFUSE(notify_inval_entry_fn, fuse_lowlevel_notify_inval_entry)
LIBFUSE(notify_delete_fn, fuse_lowlevel_notify_delete)
LIBFUSE(notify_store_fn, fuse_lowlevel_notify_store)
LIBFUSE(notify_poll_fn, fuse_lowlevel_notify_poll)
LIBFUSE(session_destroy_fn, fuse_session_destroy)

static int send_now(struct queued_reply *reply)
{
    fuse_req_t req = reply->req;
    switch (reply->kind) {
    case REPLY_ERR:
        return libfuse_fuse_reply_err()(req, reply->u.err);
    case REPLY_ENTRY:
        return libfuse_fuse_reply_entry()(req, &reply->u.entry);
    case REPLY_CREATE:
        return libfuse_fuse_reply_create()(req, &reply->u.create.entry, &reply->u.create.fi);
    case REPLY_ATTR:
        return libfuse_fuse_reply_attr()(req, &reply->u.attr.attr, reply->u.attr.timeout);
    case REPLY_READLINK:
        return libfuse_fuse_reply_readlink()(req, reply->data);
    case REPLY_OPEN:
        return libfuse_fuse_reply_open()(req, &reply->u.fi);
    case REPLY_WRITE:
        return libfuse_fuse_reply_write()(req, reply->u.count);
    case REPLY_BUF:
        return libfuse_fuse_reply_buf()(req, reply->size ? reply->data : NULL, reply->size);
    case REPLY_STATFS:
        return libfuse_fuse_reply_statfs()(req, &reply->u.statfs);
    case REPLY_XATTR:
        return libfuse_fuse_reply_xattr()(req, reply->u.count);
    case REPLY_POLL:
        return libfuse_fuse_reply_poll()(req, reply->u.revents);
    }
    return -EINVAL;
}

static void *send_replies(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&queue_lock);
    for (;;) {
        while (!queue_head && !stopping) {
            sender_idle = 1;
            pthread_cond_wait(&queue_filled, &queue_lock);
            sender_idle = 0;
        }
        if (!queue_head)
            break; /* stopping, and nothing left */
        struct queued_reply *batch = queue_head;
        queue_head = queue_tail = NULL;
        pthread_mutex_unlock(&queue_lock);
        uint64_t sent = 0, failed = 0;
        while (batch) {
            struct queued_reply *next = batch->next;
            if (send_now(batch) != 0)
                failed++;
            sent++;
            free(batch);
            batch = next;
        }
        pthread_mutex_lock(&queue_lock);
        backlog -= sent;
        stats.sent += sent;
        stats.failed += failed;
        pthread_cond_broadcast(&queue_written);
    }
    stats.running = 0;
    pthread_cond_broadcast(&queue_written);
    pthread_mutex_unlock(&queue_lock);
    return NULL;
}

/* Called with queue_lock held. */
static int start_sender_locked(void)
{
    if (stats.running)
        return 0;
    stopping = 0;
    if (pthread_create(&sender, NULL, send_replies, NULL) != 0)
        return -1;
    stats.running = 1;
    return 0;
}

static struct queued_reply *new_reply(enum reply_kind kind, fuse_req_t req, size_t size)
{
    if (!__atomic_load_n(&offloading, __ATOMIC_RELAXED))
        return NULL;
    struct queued_reply *reply = malloc(sizeof(*reply) + size);
    if (!reply)
        return NULL; /* the caller replies on its own thread */
    memset(reply, 0, sizeof(*reply));
    reply->kind = kind;
    reply->req = req;
    reply->size = size;
    return reply;
}

/* Hands the reply to the sender, or sends it here if the sender cannot run. */
static int queue_reply(struct queued_reply *reply)
{
    pthread_mutex_lock(&queue_lock);
    if (!offloading || start_sender_locked() != 0) {
        pthread_mutex_unlock(&queue_lock);
        int result = send_now(reply);
        __atomic_add_fetch(&stats.direct, 1, __ATOMIC_RELAXED);
        free(reply);
        return result;
    }
    if (queue_tail)
        queue_tail->next = reply;
    else
        queue_head = reply;
    queue_tail = reply;
    backlog++;
    stats.queued++;
    if (backlog > stats.max_backlog)
        stats.max_backlog = backlog;
    if (sender_idle) {
        stats.wakeups++;
        pthread_cond_signal(&queue_filled);
    }
    pthread_mutex_unlock(&queue_lock);
    return 0;
}

/* Waits until every reply queued so far has been written. */
static void wait_for_replies(void)
{
    pthread_mutex_lock(&queue_lock);
    uint64_t target = stats.queued;
    if (stats.sent < target)
        stats.barriers++;
    while (stats.sent < target && stats.running)
        pthread_cond_wait(&queue_written, &queue_lock);
    pthread_mutex_unlock(&queue_lock);
}

#define DIRECT(call)                                                               \
    do {                                                                           \
        __atomic_add_fetch(&stats.direct, 1, __ATOMIC_RELAXED);                    \
        return call;                                                               \
    } while (0)

int fuse_reply_err(fuse_req_t req, int err)
{
    struct queued_reply *reply = new_reply(REPLY_ERR, req, 0);
    if (!reply)
        DIRECT(libfuse_fuse_reply_err()(req, err));
    reply->u.err = err;
    return queue_reply(reply);
}

int fuse_reply_entry(fuse_req_t req, const struct fuse_entry_param *e)
{
    struct queued_reply *reply = new_reply(REPLY_ENTRY, req, 0);
    if (!reply)
        DIRECT(libfuse_fuse_reply_entry()(req, e));
    reply->u.entry = *e;
    return queue_reply(reply);
}

int fuse_reply_create(fuse_req_t req, const struct fuse_entry_param *e,
                      const struct fuse_file_info *fi)
{
    struct queued_reply *reply = new_reply(REPLY_CREATE, req, 0);
    if (!reply)
        DIRECT(libfuse_fuse_reply_create()(req, e, fi));
    reply->u.create.entry = *e;
    reply->u.create.fi = *fi;
    return queue_reply(reply);
}

int fuse_reply_attr(fuse_req_t req, const struct stat *attr, double attr_timeout)
{
    struct queued_reply *reply = new_reply(REPLY_ATTR, req, 0);
    if (!reply)
        DIRECT(libfuse_fuse_reply_attr()(req, attr, attr_timeout));
    reply->u.attr.attr = *attr;
    reply->u.attr.timeout = attr_timeout;
    return queue_reply(reply);
}

int fuse_reply_readlink(fuse_req_t req, const char *link)
{
    size_t size = strlen(link) + 1;
    struct queued_reply *reply = new_reply(REPLY_READLINK, req, size);
    if (!reply)
        DIRECT(libfuse_fuse_reply_readlink()(req, link));
    memcpy(reply->data, link, size);
    return queue_reply(reply);
}

int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    struct queued_reply *reply = new_reply(REPLY_OPEN, req, 0);
    if (!reply)
        DIRECT(libfuse_fuse_reply_open()(req, fi));
    reply->u.fi = *fi;
    return queue_reply(reply);
}

int fuse_reply_write(fuse_req_t req, size_t count)
{
    struct queued_reply *reply = new_reply(REPLY_WRITE, req, 0);
    if (!reply)
        DIRECT(libfuse_fuse_reply_write()(req, count));
    reply->u.count = count;
    return queue_reply(reply);
}

int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size)
{
    struct queued_reply *reply = new_reply(REPLY_BUF, req, buf ? size : 0);
    if (!reply)
        DIRECT(libfuse_fuse_reply_buf()(req, buf, size));
    if (buf && size)
        memcpy(reply->data, buf, size);
    return queue_reply(reply);
}

int fuse_reply_statfs(fuse_req_t req, const struct statvfs *stbuf)
{
    struct queued_reply *reply = new_reply(REPLY_STATFS, req, 0);
    if (!reply)
        DIRECT(libfuse_fuse_reply_statfs()(req, stbuf));
    reply->u.statfs = *stbuf;
    return queue_reply(reply);
}

int fuse_reply_xattr(fuse_req_t req, size_t count)
{
    struct queued_reply *reply = new_reply(REPLY_XATTR, req, 0);
    if (!reply)
        DIRECT(libfuse_fuse_reply_xattr()(req, count));
    reply->u.count = count;
    return queue_reply(reply);
}

int fuse_reply_poll(fuse_req_t req, unsigned revents)
{
    struct queued_reply *reply = new_reply(REPLY_POLL, req, 0);
    if (!reply)
        DIRECT(libfuse_fuse_reply_poll()(req, revents));
    reply->u.revents = revents;
    return queue_reply(reply);
}

int fuse_lowlevel_notify_inval_inode(struct fuse_session *se, fuse_ino_t ino, off_t off,
                                     off_t len)
{
    wait_for_replies();
    return libfuse_fuse_lowlevel_notify_inval_inode()(se, ino, off, len);
}

int fuse_lowlevel_notify_inval_entry(struct fuse_session *se, fuse_ino_t parent,
                                     const char *name, size_t namelen)
{
    wait_for_replies();
    return libfuse_fuse_lowlevel_notify_inval_entry()(se, parent, name, namelen);
}

int fuse_lowlevel_notify_delete(struct fuse_session *se, fuse_ino_t parent,
                                fuse_ino_t child, const char *name, size_t namelen)
{
    wait_for_replies();
    return libfuse_fuse_lowlevel_notify_delete()(se, parent, child, name, namelen);
}

int fuse_lowlevel_notify_store(struct fuse_session *se, fuse_ino_t ino, off_t offset,
                               struct fuse_bufvec *bufv, enum fuse_buf_copy_flags flags)
{
    wait_for_replies();
    return libfuse_fuse_lowlevel_notify_store()(se, ino, offset, bufv, flags);
}

int fuse_lowlevel_notify_poll(struct fuse_pollhandle *ph)
{
    wait_for_replies();
    return libfuse_fuse_lowlevel_notify_poll()(ph);
}

/* Stops taking new replies, writes out the queued ones and ends the sender. */
void mailfs_replies_drain(void)
{
    pthread_mutex_lock(&queue_lock);
    offloading = 0;
    int joinable = stats.running;
    stopping = 1;
    pthread_cond_signal(&queue_filled);
    pthread_mutex_unlock(&queue_lock);
    if (joinable)
        pthread_join(sender, NULL);
}

void fuse_session_destroy(struct fuse_session *se)
{
    mailfs_replies_drain();
    libfuse_fuse_session_destroy()(se);
}

void mailfs_replies_offload(int on)
{
    pthread_mutex_lock(&queue_lock);
    offloading = on;
    pthread_mutex_unlock(&queue_lock);
}

const struct mailfs_reply_stats *mailfs_replies_status(void) { return &stats; }
