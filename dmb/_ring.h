/*
 * _ring.h - the public face of dmb's shared-memory message store.
 *
 * A segment is one named POSIX shared-memory object.  Every process of a
 * site maps it at its own address, so everything inside refers to
 * everything else by index into a fixed table, never by pointer.  All
 * operations take one process-shared robust mutex for a few hundred
 * nanoseconds; a process killed while it holds the lock leaves the next
 * taker to repair the segment (see dmb_repair in _ring.c).
 *
 * The C core is quiet: no logging, no allocation, no system call while
 * the lock is held.  Functions return 0 or a positive count on success and
 * a negative DMB_E* code on failure; Python decides what to say.  Every
 * function that takes the lock may also return DMB_ERR_LOCK (unusable) or
 * DMB_ERR_STALLED (held by another for longer than any operation takes).
 *
 * The block between the cdef markers is read by dmb/_build.py and handed
 * to cffi as is, so it holds only what cffi's parser accepts: integer
 * #defines, enums, plain structs and prototypes.
 */
#ifndef DMB_RING_H
#define DMB_RING_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */
#define DMB_LAYOUT_VERSION 1
#define DMB_NAME_MAX 100      /* names are shorter than this (Channels) */
#define DMB_MAX_SLOTS 128     /* processes attached at once */
#define DMB_CLIENT_MAX 31     /* bytes of a slot's client prefix */
#define DMB_BLOCK_SIZE 256    /* bytes of one message-store block */
#define DMB_NONE 4294967295   /* the null index, UINT32_MAX */

/* Flags for dmb_recv. */
#define DMB_RECV_WAIT 1       /* if empty, mark this slot as waiting */
#define DMB_RECV_UNWAIT 2     /* if a message is taken, stop waiting */

enum dmb_error {
    DMB_ERR_FULL = -1,          /* the channel is at capacity */
    DMB_ERR_NOSPACE = -2,       /* message store (blocks or nodes) full */
    DMB_ERR_CHANNELS = -3,      /* channel table full */
    DMB_ERR_GROUPS = -4,        /* group table full */
    DMB_ERR_MEMBERS = -5,       /* membership table full */
    DMB_ERR_SLOTS = -6,         /* process table full */
    DMB_ERR_CORRUPT = -7,       /* the segment is damaged beyond repair */
    DMB_ERR_TOOBIG = -8,        /* the caller's buffer is too small */
    DMB_ERR_INVAL = -9,         /* a bad argument */
    DMB_ERR_LOCK = -10,         /* the lock is unusable */
    DMB_ERR_STALE = -11,        /* the slot was reclaimed from under us */
    DMB_ERR_MAGIC = -12,        /* not a dmb segment */
    DMB_ERR_VERSION = -13,      /* a dmb segment of another layout */
    DMB_ERR_SIZE = -14,         /* size in header and mapping disagree */
    DMB_ERR_OWNER = -15,        /* specific channel of another slot */
    DMB_ERR_UNINIT = -16,       /* all zero: never initialised */
    DMB_ERR_STALLED = -17       /* the lock stayed held past the limit */
};

/* How many of each table a segment holds; derived from its size. */
struct dmb_geometry {
    uint32_t slots;
    uint32_t channels;
    uint32_t channel_buckets;
    uint32_t groups;
    uint32_t group_buckets;
    uint32_t members;
    uint32_t member_buckets;
    uint32_t nodes;
    uint32_t blocks;
    uint32_t reserved;
};

/* The outcome counters, each raised under the lock with the change it
 * counts.  The accounting identity: sent = received + expired +
 * dropped_full + dropped_dead + flushed + queued, where sent counts each
 * delivery a send or group_send linked in, and dropped_full counts
 * group_send members skipped at capacity (plain sends over capacity are
 * refused and never counted as sent). */
struct dmb_counters {
    uint64_t sent;
    uint64_t received;
    uint64_t expired;
    uint64_t dropped_full;
    uint64_t dropped_dead;
    uint64_t flushed;
    uint64_t group_sends;
    uint64_t bytes_sent;
    uint64_t bytes_received;
    uint64_t refused_full;
    uint64_t refused_nospace;
    uint64_t repairs;
};

struct dmb_stats {
    uint64_t size;
    uint64_t created_ns;        /* CLOCK_REALTIME at initialisation */
    uint32_t version;
    uint32_t block_size;
    struct dmb_geometry geometry;
    uint32_t used_slots;
    uint32_t used_channels;
    uint32_t used_groups;
    uint32_t used_members;
    uint32_t used_nodes;
    uint32_t used_blocks;
    uint32_t peak_blocks;       /* high-water mark of used_blocks */
    uint32_t queued;            /* messages linked into channels */
    struct dmb_counters counters;
};

/* One process slot as seen from outside. */
struct dmb_slot_info {
    int32_t in_use;
    int32_t pid;
    uint32_t gen;
    uint32_t channels;          /* specific channels owned */
    uint64_t start_time;        /* /proc/<pid>/stat field 22 */
    uint64_t token;             /* names the slot's wake-up FIFO */
    uint64_t attached_ns;
    uint64_t active_ns;
    char client[32];            /* NUL-terminated client prefix */
};

struct dmb_channel_info {
    uint32_t depth;
    uint32_t capacity;
    uint32_t members;
    int32_t owner;              /* slot index, or -1 for a normal channel */
    uint64_t bytes;
    uint64_t oldest_ns;         /* CLOCK_MONOTONIC send time of the head */
    uint64_t waiters[2];        /* bit i: slot i waits on this channel */
    char name[104];             /* NUL-terminated */
};

struct dmb_group_info {
    uint32_t members;
    uint32_t reserved;
    char name[104];
};

struct dmb_member_info {
    uint64_t joined_ns;         /* CLOCK_MONOTONIC */
    char channel[104];
};

/* Slots whose FIFO a caller must write to after an operation, and what
 * to tell them: the index of the channel that got a message, or DMB_NONE
 * (a group send) for "look at every channel you wait on". */
struct dmb_wake {
    uint64_t mask[2];
    uint32_t channel;
    uint32_t reserved;
};

/* A process's private view of one mapped segment: the base address and
 * the geometry and table offsets, computed here from the size when the
 * segment is attached and never read again from shared memory, so a
 * damaged header cannot send an access outside the mapping.  Python
 * allocates it; dmb_init and dmb_attach fill it. */
struct dmb_handle {
    void *base;
    uint64_t size;
    struct dmb_geometry geo;
    uint64_t off_slots;
    uint64_t off_channels;
    uint64_t off_channel_buckets;
    uint64_t off_groups;
    uint64_t off_group_buckets;
    uint64_t off_members;
    uint64_t off_member_buckets;
    uint64_t off_nodes;
    uint64_t off_blocks;
    uint64_t off_marks;
    uint64_t end;
};

/* Fill *g for a segment of size bytes; returns DMB_ERR_INVAL if too small. */
int dmb_geometry_for_size(uint64_t size, struct dmb_geometry *g);

/* Smallest segment size dmb accepts. */
uint64_t dmb_min_size(void);

/* Format a fresh segment of size bytes at base.  The caller must hold the
 * segment exclusively (dmb holds an flock on it).  The magic number is
 * written last, so a process that sees it sees a whole segment. */
int dmb_init(struct dmb_handle *h, void *base, uint64_t size,
             uint64_t now_real_ns);

/* Check the header of a mapped segment and fill *h: 0, or DMB_ERR_UNINIT
 * (all zero), DMB_ERR_MAGIC, DMB_ERR_VERSION, DMB_ERR_SIZE (the mapping is
 * smaller than the header says), DMB_ERR_CORRUPT. */
int dmb_attach(struct dmb_handle *h, void *base, uint64_t mapped_size);

/* The size recorded in a segment's header (0 if unreadable). */
uint64_t dmb_header_size(const void *base, uint64_t mapped_size);

/* The header's layout version (0 if unreadable). */
uint32_t dmb_header_version(const void *base, uint64_t mapped_size);

/* Take a free process slot.  Returns the slot index, or DMB_ERR_SLOTS. */
int dmb_slot_acquire(struct dmb_handle *h, int32_t pid, uint64_t start_time,
                     uint64_t token, const char *client, uint32_t client_len,
                     uint64_t now);

/* Give back slot (if it still has generation gen): its specific channels
 * and their memberships go, their queued messages counted dropped_dead;
 * its waiting marks are cleared everywhere. */
int dmb_slot_release(struct dmb_handle *h, uint32_t slot, uint32_t gen);

/* Copy slot's state into *out (no lock: a snapshot for liveness checks). */
int dmb_slot_info(struct dmb_handle *h, uint32_t slot,
                  struct dmb_slot_info *out);

/* Reclaim slot if it still holds (pid, start_time): as dmb_slot_release.
 * Returns 1 if reclaimed, 0 if the slot had changed. */
int dmb_slot_reclaim(struct dmb_handle *h, uint32_t slot, int32_t pid,
                     uint64_t start_time);

/* Link a message into a channel.  deadline is CLOCK_MONOTONIC ns after
 * which the message expires.  Returns 0 or DMB_ERR_FULL, _NOSPACE,
 * _CHANNELS, _INVAL, _CORRUPT; on success *wake holds the slots to wake. */
int dmb_send(struct dmb_handle *h, uint32_t slot, const char *name,
             uint32_t name_len, uint32_t capacity, const void *data,
             uint32_t len, uint64_t now, uint64_t deadline,
             struct dmb_wake *wake);

/* Take the head message of a channel into buf.  Returns 1 with *len set,
 * 0 if empty (with DMB_RECV_WAIT, slot is now marked waiting and *len is
 * the channel's index, the one a sender's dmb_wake will name), or
 * DMB_ERR_TOOBIG with *len set to the size needed (nothing taken),
 * DMB_ERR_OWNER, DMB_ERR_CHANNELS, DMB_ERR_CORRUPT. */
int dmb_recv(struct dmb_handle *h, uint32_t slot, const char *name,
             uint32_t name_len, uint32_t capacity, uint64_t now,
             uint32_t flags, void *buf, uint32_t buf_len, uint32_t *len);

/* Stop marking slot as waiting on a channel. */
int dmb_unwait(struct dmb_handle *h, uint32_t slot, const char *name,
               uint32_t name_len);

/* Add (or refresh) a membership.  capacity is the channel's, used if the
 * channel entry has to be made. */
int dmb_group_add(struct dmb_handle *h, uint32_t slot, const char *group,
                  uint32_t group_len, const char *channel,
                  uint32_t channel_len, uint32_t capacity, uint64_t now);

/* Remove a membership if there is one (no error if not). */
int dmb_group_discard(struct dmb_handle *h, const char *group,
                      uint32_t group_len,
                      const char *channel, uint32_t channel_len);

/* Store data once and link it into every live member below capacity.
 * Memberships older than group_expiry_ns are removed first.  Returns the
 * number of deliveries; *full counts members skipped at capacity and
 * *nospace those skipped because the store was full. */
int dmb_group_send(struct dmb_handle *h, const char *group, uint32_t group_len,
                   const void *data, uint32_t len, uint64_t now,
                   uint64_t deadline, uint64_t group_expiry_ns,
                   uint32_t *full, uint32_t *nospace, struct dmb_wake *wake);

/* Drop every queued message (counted flushed) and every group.  Process
 * slots and waiting marks stay, so a receive waiting now still hears the
 * next send. */
int dmb_flush(struct dmb_handle *h);

/* Remove expired messages and memberships everywhere.  Returns the number
 * of messages expired. */
int dmb_expire(struct dmb_handle *h, uint64_t now, uint64_t group_expiry_ns);

/* Check and rebuild every table (free lists, counts, links) under the
 * lock.  Returns 0 or DMB_ERR_CORRUPT/DMB_ERR_LOCK. */
int dmb_repair(struct dmb_handle *h);

int dmb_stats(struct dmb_handle *h, struct dmb_stats *out);

/* Iterate tables by index: 1 and *out filled if index is in use, 0 if
 * not, DMB_ERR_INVAL past the end. */
int dmb_channel_at(struct dmb_handle *h, uint32_t index,
                   struct dmb_channel_info *out);
int dmb_group_at(struct dmb_handle *h, uint32_t index,
                 struct dmb_group_info *out);

/* The memberships of a group, from position start; returns how many of
 * at most n were written to out. */
int dmb_group_members(struct dmb_handle *h, const char *group,
                      uint32_t group_len,
                      uint32_t start, struct dmb_member_info *out,
                      uint32_t n);

/* Copy the message at position pos of a channel without taking it.
 * Returns 1, 0 if there is none, or DMB_ERR_TOOBIG with *len set. */
int dmb_peek(struct dmb_handle *h, const char *name, uint32_t name_len,
             uint32_t pos,
             void *buf, uint32_t buf_len, uint32_t *len,
             uint64_t *sent_ns);

/* Drop every message queued on one channel (counted flushed). */
int dmb_purge(struct dmb_handle *h, const char *name, uint32_t name_len);

/* Test support: make the next locked operation stop at step point, with
 * the lock held (raise(SIGKILL) when action is 1, pause when 2). */
void dmb_test_crash_at(int point, int action);

/* Test support: how long (ms) an operation of this process waits for a
 * lock that another holds before it fails with DMB_ERR_STALLED; 10 s
 * unless set. */
void dmb_test_lock_patience(uint64_t ms);

/* Moving messages between channels: acknowledgements for dmb/kombu.py.
 * A message is in exactly one channel at every instant, even when its
 * mover dies mid-step (the header's move journal; see _ring.c). */

/* One delivery that dmb_move put in a channel: its node, and the stamp
 * that tells it from a later message in the same node. */
struct dmb_ref {
    uint32_t node;
    uint32_t reserved;
    uint64_t stamp;
};

/* Move the head message of src to the tail of dst (made if absent, with
 * capacity) in one locked step, copying it into buf unless buf is NULL.
 * Expired messages at src's head are dropped first.  Returns 1 with *len
 * and *ref set; 0 if src is empty (with DMB_RECV_WAIT, slot now waits on
 * src and *len is its index; DMB_RECV_UNWAIT stops the wait when a
 * message moves); DMB_ERR_FULL if dst is at capacity, DMB_ERR_TOOBIG with
 * *len the size needed (nothing moved either way); DMB_ERR_OWNER,
 * DMB_ERR_CHANNELS, DMB_ERR_INVAL (src and dst the same), _CORRUPT.  On
 * success *wake holds the slots waiting on dst. */
int dmb_move(struct dmb_handle *h, uint32_t slot, const char *src,
             uint32_t src_len, const char *dst, uint32_t dst_len,
             uint32_t capacity, uint64_t now, uint32_t flags, void *buf,
             uint32_t buf_len, uint32_t *len, struct dmb_ref *ref,
             struct dmb_wake *wake);

/* Settle the delivery *ref in channel name: with dst NULL drop it,
 * counted received (an acknowledgement); otherwise move it to the tail
 * of dst as dmb_move does.  Returns 1, 0 if ref is not there (settled
 * already), DMB_ERR_FULL, DMB_ERR_INVAL, _CHANNELS, _CORRUPT. */
int dmb_settle(struct dmb_handle *h, uint32_t slot, const char *name,
               uint32_t name_len, const struct dmb_ref *ref, const char *dst,
               uint32_t dst_len, uint32_t capacity, uint64_t now,
               struct dmb_wake *wake);

/* Drop the first message of a channel whose bytes equal data (counted
 * flushed).  Returns 1, or 0 if there is none. */
int dmb_remove(struct dmb_handle *h, const char *name, uint32_t name_len,
               const void *data, uint32_t len);

/* A channel's state by name: 1 and *out filled, or 0 if it has no entry
 * (an empty channel nobody waits on has none). */
int dmb_channel_find(struct dmb_handle *h, const char *name,
                     uint32_t name_len, struct dmb_channel_info *out);

/* Look at up to max_steps channel entries from index *pos for a name
 * that starts with prefix.  Returns 1 with *pos its index (read it with
 * dmb_channel_at, go on from *pos + 1), or 0 with *pos where to go on;
 * the table ends at geometry.channels. */
int dmb_channel_scan(struct dmb_handle *h, uint32_t *pos, const char *prefix,
                     uint32_t prefix_len, uint32_t max_steps);
/* cdef-end */

#ifdef __cplusplus
}
#endif

#endif /* DMB_RING_H */
