/*
 * _ring.c - dmb's message store in one POSIX shared-memory segment.
 *
 * Byte layout (all offsets from the segment start, computed from the size
 * alone by tables_bytes(), so every process derives the same map):
 *
 *   header            magic, version, size, the lock, free lists, counters
 *   slots[]           one per attached process (DMB_MAX_SLOTS)
 *   channels[]        channel entries, chained from channel_buckets[]
 *   channel_buckets[] heads of the channel hash chains
 *   groups[]          group entries, chained from group_buckets[]
 *   group_buckets[]
 *   members[]         (group, channel) pairs, listed per group and chained
 *   member_buckets[]  from member_buckets[] by the pair's hash
 *   nodes[]           queue entries: one per queued delivery
 *   blocks[]          message records, DMB_BLOCK_SIZE bytes each, chained
 *   marks[]           scratch bytes for dmb_repair's reachability walk
 *
 * Invariants (hold whenever the lock is free):
 *   I1  Everything in use is reachable from a bucket array: channel chains
 *       reach channels, their queues reach nodes, nodes reach records,
 *       group chains reach groups, and group lists reach members.
 *       Everything else is on its table's free list or leaked; dmb_repair
 *       rebuilds every free list from reachability, so a leak lasts only
 *       until the next repair.
 *   I2  Writers fill an entry completely before the single store that
 *       links it in, and unlink an entry before they free it.  A process
 *       killed between any two stores therefore leaves at worst a leaked
 *       entry or a stale derived field (tail, depth, counts), and
 *       dmb_repair recomputes every derived field from the links.
 *   I3  A record's refs equals the number of nodes that point at it.
 *   I4  Indices read from shared memory are checked against the private
 *       geometry in struct dmb_handle before use; a walk takes at most as
 *       many steps as its table has entries.  A failed check returns
 *       DMB_ERR_CORRUPT and the caller repairs.
 *
 * Nothing here allocates, logs, or makes a system call while holding the
 * lock (the test crash points excepted).
 */
#define _GNU_SOURCE
#include "_ring.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DMB_MAGIC 0x31474e4952424d44ULL /* "DMBRING1" */
#define BLOCK_PAYLOAD (DMB_BLOCK_SIZE - 16)
#define MIN_SIZE (1u << 20)

/* ------------------------------------------------------------------ */
/* Shared structures.  Their sizes are part of the layout version.     */

struct dmb_slot {
    uint32_t in_use;
    uint32_t gen;
    int32_t pid;
    uint32_t channels;
    uint64_t start_time;
    uint64_t token;
    uint64_t attached_ns;
    uint64_t active_ns;
    uint8_t client_len;
    char client[DMB_CLIENT_MAX];
};

struct dmb_channel {
    uint32_t next;      /* hash chain, or free list */
    uint32_t head;      /* oldest node, DMB_NONE if empty */
    uint32_t tail;      /* derived: last node of the head chain */
    uint32_t depth;     /* derived: nodes in the queue */
    uint32_t capacity;
    uint32_t members;   /* derived: memberships naming this channel */
    int32_t owner;      /* slot of a specific channel, -1 otherwise */
    uint32_t name_len;  /* 0 while the entry is free */
    uint64_t hash;
    uint64_t bytes;     /* derived: payload bytes queued */
    uint64_t waiters[2];
    char name[DMB_NAME_MAX];
};

struct dmb_group {
    uint32_t next;      /* hash chain, or free list */
    uint32_t first;     /* first member */
    uint32_t count;     /* derived */
    uint32_t name_len;
    uint64_t hash;
    char name[DMB_NAME_MAX];
};

struct dmb_member {
    uint32_t gnext;     /* next member of the same group */
    uint32_t gprev;     /* derived */
    uint32_t hnext;     /* member hash chain, or free list */
    uint32_t group;
    uint32_t channel;
    uint32_t in_use;
    uint64_t joined_ns;
};

struct dmb_node {
    uint32_t next;
    uint32_t record;    /* first block of the record */
    uint64_t sent_ns;
    uint64_t deadline;
};

struct dmb_block {
    uint32_t next;      /* next block of the record, or free list */
    uint32_t refs;      /* first block only: nodes pointing here (I3) */
    uint32_t len;       /* first block only: payload bytes */
    uint32_t reserved;
    unsigned char data[BLOCK_PAYLOAD];
};

struct dmb_header {
    uint64_t magic;     /* written last by dmb_init */
    uint32_t version;
    uint32_t block_size;
    uint64_t size;
    uint64_t created_ns;
    struct dmb_geometry geo;
    uint64_t reserved[2];
    pthread_mutex_t lock __attribute__((aligned(64)));
    uint32_t free_channels;
    uint32_t free_groups;
    uint32_t free_members;
    uint32_t free_nodes;
    uint32_t free_blocks;
    uint32_t used_slots;
    uint32_t used_channels;
    uint32_t used_groups;
    uint32_t used_members;
    uint32_t used_nodes;
    uint32_t used_blocks;
    uint32_t peak_blocks;
    uint32_t queued;
    uint32_t slot_gen;
    struct dmb_counters counters;
    uint32_t move_node; /* a dmb_move in flight: its node + 1, 0 if none */
    uint32_t move_dst;  /* and the channel it goes to (see repair_move) */
};

_Static_assert(sizeof(struct dmb_slot) == 80, "slot layout");
_Static_assert(sizeof(struct dmb_channel) == 168, "channel layout");
_Static_assert(sizeof(struct dmb_group) == 128, "group layout");
_Static_assert(sizeof(struct dmb_member) == 32, "member layout");
_Static_assert(sizeof(struct dmb_node) == 24, "node layout");
_Static_assert(sizeof(struct dmb_block) == DMB_BLOCK_SIZE, "block layout");
_Static_assert(offsetof(struct dmb_header, lock) == 128, "lock offset");
_Static_assert(sizeof(struct dmb_header) <= 512, "header fits its page part");
_Static_assert(DMB_MAX_SLOTS == 128, "waiter masks hold 128 bits");
_Static_assert(DMB_NAME_MAX + 4 <= sizeof(((struct dmb_channel_info *)0)->name),
               "info names hold a whole name");

#define HEADER_BYTES 512

/* ------------------------------------------------------------------ */
/* Test crash points.                                                  */

static int crash_point;
static int crash_action;

void dmb_test_crash_at(int point, int action)
{
    crash_point = point;
    crash_action = action;
}

/* Stop here, lock held, if a test asked for this point. */
static void crash_here(int point)
{
    if (crash_point == 0 || crash_point != point)
        return;
    if (crash_action == 1)
        raise(SIGKILL);
    for (;;)
        pause();
}

/* ------------------------------------------------------------------ */
/* Layout.                                                             */

static uint32_t pow2_at_least(uint32_t n)
{
    uint32_t p = 1;

    while (p < n)
        p <<= 1;
    return p;
}

static uint32_t clamp_u32(uint64_t v, uint32_t lo, uint32_t hi)
{
    if (v < lo)
        return lo;
    if (v > hi)
        return hi;
    return (uint32_t)v;
}

static uint64_t align64(uint64_t v)
{
    return (v + 63) & ~(uint64_t)63;
}

/* Every table but blocks scales with the size; blocks take the rest. */
static uint64_t tables_bytes(const struct dmb_geometry *g, uint32_t blocks,
                             struct dmb_handle *h)
{
    uint64_t off = HEADER_BYTES;

#define PLACE(field, count, unit)                                          \
    do {                                                                   \
        if (h)                                                             \
            h->field = off;                                                \
        off = align64(off + (uint64_t)(count) * (unit));                   \
    } while (0)
    PLACE(off_slots, g->slots, sizeof(struct dmb_slot));
    PLACE(off_channels, g->channels, sizeof(struct dmb_channel));
    PLACE(off_channel_buckets, g->channel_buckets, sizeof(uint32_t));
    PLACE(off_groups, g->groups, sizeof(struct dmb_group));
    PLACE(off_group_buckets, g->group_buckets, sizeof(uint32_t));
    PLACE(off_members, g->members, sizeof(struct dmb_member));
    PLACE(off_member_buckets, g->member_buckets, sizeof(uint32_t));
    PLACE(off_nodes, g->nodes, sizeof(struct dmb_node));
    PLACE(off_blocks, blocks, DMB_BLOCK_SIZE);
    PLACE(off_marks, (uint64_t)g->channels + g->groups + g->members +
                         g->nodes + blocks, 1);
#undef PLACE
    if (h)
        h->end = off;
    return off;
}

uint64_t dmb_min_size(void)
{
    return MIN_SIZE;
}

int dmb_geometry_for_size(uint64_t size, struct dmb_geometry *g)
{
    uint64_t fixed;

    if (size < MIN_SIZE || size > ((uint64_t)1 << 40))
        return DMB_ERR_INVAL;
    memset(g, 0, sizeof(*g));
    g->slots = DMB_MAX_SLOTS;
    g->channels = clamp_u32(size / 2048, 256, 1u << 24);
    g->channel_buckets = pow2_at_least(g->channels);
    g->groups = clamp_u32(size / 4096, 128, 1u << 23);
    g->group_buckets = pow2_at_least(g->groups);
    g->members = clamp_u32(size / 1024, 512, 1u << 25);
    g->member_buckets = pow2_at_least(g->members);
    g->nodes = clamp_u32(size / 512, 1024, 1u << 26);
    fixed = tables_bytes(g, 0, NULL);
    if (fixed + 64 * (DMB_BLOCK_SIZE + 1) > size)
        return DMB_ERR_INVAL;
    g->blocks = (uint32_t)((size - fixed - 64) / (DMB_BLOCK_SIZE + 1));
    while (tables_bytes(g, g->blocks, NULL) > size)
        g->blocks--;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Access.  Table pointers come from the private handle (I4).          */

#define HDR(h) ((struct dmb_header *)(h)->base)
#define AT(h, off, type) ((type *)((char *)(h)->base + (h)->off))

static struct dmb_slot *slots(struct dmb_handle *h)
{
    return AT(h, off_slots, struct dmb_slot);
}

static struct dmb_channel *chan(struct dmb_handle *h, uint32_t i)
{
    return AT(h, off_channels, struct dmb_channel) + i;
}

static uint32_t *chan_buckets(struct dmb_handle *h)
{
    return AT(h, off_channel_buckets, uint32_t);
}

static struct dmb_group *group(struct dmb_handle *h, uint32_t i)
{
    return AT(h, off_groups, struct dmb_group) + i;
}

static uint32_t *group_buckets(struct dmb_handle *h)
{
    return AT(h, off_group_buckets, uint32_t);
}

static struct dmb_member *member(struct dmb_handle *h, uint32_t i)
{
    return AT(h, off_members, struct dmb_member) + i;
}

static uint32_t *member_buckets(struct dmb_handle *h)
{
    return AT(h, off_member_buckets, uint32_t);
}

static struct dmb_node *node(struct dmb_handle *h, uint32_t i)
{
    return AT(h, off_nodes, struct dmb_node) + i;
}

static struct dmb_block *block(struct dmb_handle *h, uint32_t i)
{
    return AT(h, off_blocks, struct dmb_block) + i;
}

static unsigned char *marks(struct dmb_handle *h)
{
    return AT(h, off_marks, unsigned char);
}

static uint64_t hash_name(const char *s, uint32_t len)
{
    uint64_t x = 1469598103934665603ULL; /* FNV-1a */

    for (uint32_t i = 0; i < len; i++) {
        x ^= (unsigned char)s[i];
        x *= 1099511628211ULL;
    }
    return x;
}

static uint32_t member_hash(struct dmb_handle *h, uint32_t g, uint32_t c)
{
    uint64_t x = (uint64_t)g * 0x9E3779B97F4A7C15ULL ^ (uint64_t)c;

    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 32;
    return (uint32_t)x & (h->geo.member_buckets - 1);
}

static int names_equal(const char *a, uint32_t alen, const char *b,
                       uint32_t blen)
{
    return alen == blen && memcmp(a, b, alen) == 0;
}

static void mask_set(uint64_t *m, uint32_t slot)
{
    m[slot >> 6] |= (uint64_t)1 << (slot & 63);
}

static void mask_clear(uint64_t *m, uint32_t slot)
{
    m[slot >> 6] &= ~((uint64_t)1 << (slot & 63));
}

/* ------------------------------------------------------------------ */
/* The lock.                                                           */

static void repair_locked(struct dmb_handle *h);

/* How long lock() waits for a holder that does not let go.  A holder
 * keeps the lock for microseconds, and one that dies is noticed at once
 * (EOWNERDEAD); but one that is stopped (SIGSTOP, a debugger), or a lock
 * word damaged into "held", would otherwise stall every process of the
 * site for good.  Tests shorten it (dmb_test_lock_patience). */
static uint64_t lock_patience_ns = 10ull * 1000000000ull;

void dmb_test_lock_patience(uint64_t ms)
{
    lock_patience_ns = ms * 1000000ull;
}

/* pthread_mutex_lock with a time limit; the clock is read only when the
 * lock is taken, outside it. */
static int wait_for_lock(pthread_mutex_t *m)
{
    struct timespec t;
    uint64_t ns;
    int rc = pthread_mutex_trylock(m);

    if (rc != EBUSY)
        return rc;
    clock_gettime(CLOCK_REALTIME, &t);
    ns = (uint64_t)t.tv_nsec + lock_patience_ns;
    t.tv_sec += (time_t)(ns / 1000000000ull);
    t.tv_nsec = (long)(ns % 1000000000ull);
    return pthread_mutex_timedlock(m, &t);
}

/* Take the segment lock.  A holder that died leaves EOWNERDEAD: repair
 * everything it may have half-done (I2), then mark the mutex usable.
 * DMB_ERR_STALLED if it stays held past lock_patience_ns. */
static int lock(struct dmb_handle *h)
{
    int rc = wait_for_lock(&HDR(h)->lock);

    if (rc == ETIMEDOUT)
        return DMB_ERR_STALLED;
    if (rc == EOWNERDEAD) {
        repair_locked(h);
        HDR(h)->counters.repairs++;
        if (pthread_mutex_consistent(&HDR(h)->lock) != 0)
            return DMB_ERR_LOCK;
        return 0;
    }
    return rc == 0 ? 0 : DMB_ERR_LOCK;
}

static void unlock(struct dmb_handle *h)
{
    pthread_mutex_unlock(&HDR(h)->lock);
}

/* ------------------------------------------------------------------ */
/* Free lists.  Each allocation checks the index it read (I4).        */

static int alloc_node(struct dmb_handle *h, uint32_t *out)
{
    struct dmb_header *hd = HDR(h);
    uint32_t i = hd->free_nodes;

    if (i == DMB_NONE)
        return 0;
    if (i >= h->geo.nodes)
        return DMB_ERR_CORRUPT;
    hd->free_nodes = node(h, i)->next;
    hd->used_nodes++;
    *out = i;
    return 1;
}

static void free_node(struct dmb_handle *h, uint32_t i)
{
    node(h, i)->next = HDR(h)->free_nodes;
    HDR(h)->free_nodes = i;
    HDR(h)->used_nodes--;
}

static uint32_t blocks_for(uint32_t len)
{
    return len == 0 ? 1
                    : (uint32_t)(((uint64_t)len + BLOCK_PAYLOAD - 1) /
                                 BLOCK_PAYLOAD);
}

/* Free a record's chain of blocks (unlinked already, I2).  No chain holds
 * more blocks than are in use: a damaged length (up to 4 GiB) over a chain
 * that loops would otherwise walk for millions of steps and wrap the
 * count of used blocks. */
static void free_record(struct dmb_handle *h, uint32_t rec)
{
    uint32_t n = blocks_for(block(h, rec)->len);
    uint32_t i = rec;

    while (n-- > 0 && i < h->geo.blocks && HDR(h)->used_blocks > 0) {
        uint32_t next = block(h, i)->next;

        block(h, i)->next = HDR(h)->free_blocks;
        block(h, i)->refs = 0;
        HDR(h)->free_blocks = i;
        HDR(h)->used_blocks--;
        i = next;
    }
}

/* Copy data into a fresh chain of blocks.  Returns 1 with *out set, 0 if
 * the store has too few free blocks, or DMB_ERR_CORRUPT. */
static int store_record(struct dmb_handle *h, const void *data, uint32_t len,
                        uint32_t *out)
{
    struct dmb_header *hd = HDR(h);
    uint32_t n = blocks_for(len);
    const unsigned char *src = data;
    uint32_t first = DMB_NONE, prev = DMB_NONE;

    /* More blocks in use than exist: a damaged count, which would refuse
     * every message as if the store were full until someone repaired. */
    if (hd->used_blocks > h->geo.blocks)
        return DMB_ERR_CORRUPT;
    if ((uint64_t)hd->used_blocks + n > h->geo.blocks)
        return 0;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = hd->free_blocks;
        uint32_t chunk = len > BLOCK_PAYLOAD ? BLOCK_PAYLOAD : len;

        if (i >= h->geo.blocks) {
            if (first != DMB_NONE) {
                block(h, first)->len = (k - 1) * BLOCK_PAYLOAD + 1;
                free_record(h, first);
            }
            return DMB_ERR_CORRUPT;
        }
        hd->free_blocks = block(h, i)->next;
        hd->used_blocks++;
        memcpy(block(h, i)->data, src, chunk);
        block(h, i)->next = DMB_NONE;
        src += chunk;
        len -= chunk;
        if (prev == DMB_NONE)
            first = i;
        else
            block(h, prev)->next = i;
        prev = i;
    }
    block(h, first)->len = (uint32_t)(src - (const unsigned char *)data);
    block(h, first)->refs = 0;
    if (hd->used_blocks > hd->peak_blocks)
        hd->peak_blocks = hd->used_blocks;
    *out = first;
    return 1;
}

/* Copy a record out; checks every block index of the chain (I4). */
static int copy_record(struct dmb_handle *h, uint32_t rec, void *buf,
                       uint32_t buf_len, uint32_t *len)
{
    uint32_t total, left, i = rec;
    unsigned char *dst = buf;

    if (rec >= h->geo.blocks)
        return DMB_ERR_CORRUPT;
    total = block(h, rec)->len;
    /* A length the whole store could not hold is damage, not a request
     * for a buffer of up to 4 GiB. */
    if (total > (uint64_t)h->geo.blocks * BLOCK_PAYLOAD)
        return DMB_ERR_CORRUPT;
    *len = total;
    if (total > buf_len)
        return DMB_ERR_TOOBIG;
    left = total;
    for (uint32_t k = blocks_for(total); k > 0; k--) {
        uint32_t chunk = left > BLOCK_PAYLOAD ? BLOCK_PAYLOAD : left;

        if (i >= h->geo.blocks)
            return DMB_ERR_CORRUPT;
        memcpy(dst, block(h, i)->data, chunk);
        dst += chunk;
        left -= chunk;
        i = block(h, i)->next;
    }
    return 1;
}

static void unref_record(struct dmb_handle *h, uint32_t rec)
{
    struct dmb_block *b = block(h, rec);

    if (b->refs > 1) {
        b->refs--;
        return;
    }
    free_record(h, rec);
}

/* ------------------------------------------------------------------ */
/* Channels.                                                           */

/* Find a channel entry.  Returns 1 with *out, 0 if absent, or corrupt. */
static int find_channel(struct dmb_handle *h, const char *name, uint32_t len,
                        uint64_t hash, uint32_t *out)
{
    uint32_t i = chan_buckets(h)[hash & (h->geo.channel_buckets - 1)];

    for (uint32_t steps = 0; i != DMB_NONE; steps++) {
        struct dmb_channel *c;

        if (i >= h->geo.channels || steps > h->geo.channels)
            return DMB_ERR_CORRUPT;
        c = chan(h, i);
        if (c->hash == hash && names_equal(c->name, c->name_len, name, len)) {
            *out = i;
            return 1;
        }
        i = c->next;
    }
    return 0;
}

/* The slot whose client prefix a specific channel name carries: the bytes
 * just before its '!', after a '.' or at the start.  -1 if none. */
static int32_t owner_of(struct dmb_handle *h, const char *name, uint32_t len)
{
    const char *bang = memchr(name, '!', len);
    uint32_t end;

    if (!bang)
        return -1;
    end = (uint32_t)(bang - name);
    for (uint32_t s = 0; s < h->geo.slots; s++) {
        struct dmb_slot *sl = &slots(h)[s];
        uint32_t cl = sl->client_len;

        if (!sl->in_use || cl == 0 || cl > DMB_CLIENT_MAX || cl > end)
            continue;
        if (memcmp(name + end - cl, sl->client, cl) != 0)
            continue;
        if (end == cl || name[end - cl - 1] == '.')
            return (int32_t)s;
    }
    return -1;
}

/* Make a channel entry.  Returns 1 with *out, DMB_ERR_OWNER for a
 * specific name whose process is gone, DMB_ERR_CHANNELS if the table is
 * full, or corrupt. */
static int make_channel(struct dmb_handle *h, const char *name, uint32_t len,
                        uint64_t hash, uint32_t capacity, uint32_t *out)
{
    struct dmb_header *hd = HDR(h);
    uint32_t *bucket = &chan_buckets(h)[hash & (h->geo.channel_buckets - 1)];
    int32_t owner = -1;
    struct dmb_channel *c;
    uint32_t i = hd->free_channels;

    if (memchr(name, '!', len)) {
        owner = owner_of(h, name, len);
        if (owner < 0)
            return DMB_ERR_OWNER;
    }
    if (i == DMB_NONE)
        return DMB_ERR_CHANNELS;
    if (i >= h->geo.channels)
        return DMB_ERR_CORRUPT;
    c = chan(h, i);
    hd->free_channels = c->next;
    memset(c, 0, sizeof(*c));
    c->head = c->tail = DMB_NONE;
    c->capacity = capacity;
    c->owner = owner;
    c->hash = hash;
    c->name_len = len;
    memcpy(c->name, name, len);
    c->next = *bucket;
    *bucket = i; /* links it in (I2) */
    hd->used_channels++;
    if (owner >= 0)
        slots(h)[owner].channels++;
    *out = i;
    return 1;
}

static int find_or_make_channel(struct dmb_handle *h, const char *name,
                                uint32_t len, uint32_t capacity,
                                uint32_t *out)
{
    uint64_t hash = hash_name(name, len);
    int rc = find_channel(h, name, len, hash, out);

    if (rc != 0)
        return rc;
    return make_channel(h, name, len, hash, capacity, out);
}

/* Unlink and free a channel entry with nothing left in it. */
static void drop_channel_if_idle(struct dmb_handle *h, uint32_t i)
{
    struct dmb_channel *c = chan(h, i);
    uint32_t *link;

    if (c->head != DMB_NONE || c->members || c->waiters[0] || c->waiters[1])
        return;
    link = &chan_buckets(h)[c->hash & (h->geo.channel_buckets - 1)];
    for (uint32_t steps = 0; *link != i; steps++) {
        if (*link >= h->geo.channels || steps > h->geo.channels)
            return; /* not reachable: repair will reclaim it */
        link = &chan(h, *link)->next;
    }
    *link = c->next;
    if (c->owner >= 0 && (uint32_t)c->owner < h->geo.slots &&
        slots(h)[c->owner].channels > 0)
        slots(h)[c->owner].channels--;
    c->name_len = 0;
    c->next = HDR(h)->free_channels;
    HDR(h)->free_channels = i;
    HDR(h)->used_channels--;
}

/* Callers have checked the tail with tail_ok(). */
static void append_node(struct dmb_handle *h, struct dmb_channel *c,
                        uint32_t n, uint32_t len)
{
    node(h, n)->next = DMB_NONE;
    if (c->head == DMB_NONE)
        c->head = n; /* links it in (I2) */
    else
        node(h, c->tail)->next = n; /* links it in (I2) */
    c->tail = n;
    c->depth++;
    c->bytes += len;
    HDR(h)->queued++;
}

static int tail_ok(struct dmb_handle *h, const struct dmb_channel *c)
{
    return c->head == DMB_NONE || c->tail < h->geo.nodes;
}

/* Unlink the head node of a non-empty queue and return it. */
static int pop_head(struct dmb_handle *h, struct dmb_channel *c,
                    uint32_t *out)
{
    uint32_t n = c->head;
    uint32_t rec;

    if (n >= h->geo.nodes)
        return DMB_ERR_CORRUPT;
    rec = node(h, n)->record;
    if (rec >= h->geo.blocks)
        return DMB_ERR_CORRUPT;
    c->head = node(h, n)->next; /* unlinks it (I2) */
    if (c->head == DMB_NONE)
        c->tail = DMB_NONE;
    if (c->depth)
        c->depth--;
    c->bytes -= c->bytes < block(h, rec)->len ? c->bytes : block(h, rec)->len;
    if (HDR(h)->queued)
        HDR(h)->queued--;
    *out = n;
    return 0;
}

/* Drop the head node: unlink, release its record, free it. */
static int discard_head(struct dmb_handle *h, struct dmb_channel *c)
{
    uint32_t n;
    int rc = pop_head(h, c, &n);

    if (rc)
        return rc;
    unref_record(h, node(h, n)->record);
    free_node(h, n);
    return 0;
}

/* Drop head messages past their deadline, counted expired. */
static int expire_head(struct dmb_handle *h, struct dmb_channel *c,
                       uint64_t now)
{
    for (uint32_t steps = 0; c->head != DMB_NONE; steps++) {
        int rc;

        if (c->head >= h->geo.nodes || steps > h->geo.nodes)
            return DMB_ERR_CORRUPT;
        if (node(h, c->head)->deadline > now)
            break;
        rc = discard_head(h, c);
        if (rc)
            return rc;
        HDR(h)->counters.expired++;
    }
    return 0;
}

/* Drop every queued message of a channel into the given counter. */
static int empty_channel(struct dmb_handle *h, struct dmb_channel *c,
                         uint64_t *counter)
{
    for (uint32_t steps = 0; c->head != DMB_NONE; steps++) {
        int rc;

        if (steps > h->geo.nodes)
            return DMB_ERR_CORRUPT;
        rc = discard_head(h, c);
        if (rc)
            return rc;
        (*counter)++;
    }
    return 0;
}

static void add_waiters(struct dmb_wake *wake, const struct dmb_channel *c)
{
    wake->mask[0] |= c->waiters[0];
    wake->mask[1] |= c->waiters[1];
}

/* ------------------------------------------------------------------ */
/* Groups and memberships.                                             */

static int find_group(struct dmb_handle *h, const char *name, uint32_t len,
                      uint64_t hash, uint32_t *out)
{
    uint32_t i = group_buckets(h)[hash & (h->geo.group_buckets - 1)];

    for (uint32_t steps = 0; i != DMB_NONE; steps++) {
        struct dmb_group *g;

        if (i >= h->geo.groups || steps > h->geo.groups)
            return DMB_ERR_CORRUPT;
        g = group(h, i);
        if (g->hash == hash && names_equal(g->name, g->name_len, name, len)) {
            *out = i;
            return 1;
        }
        i = g->next;
    }
    return 0;
}

static int make_group(struct dmb_handle *h, const char *name, uint32_t len,
                      uint64_t hash, uint32_t *out)
{
    struct dmb_header *hd = HDR(h);
    uint32_t *bucket = &group_buckets(h)[hash & (h->geo.group_buckets - 1)];
    uint32_t i = hd->free_groups;
    struct dmb_group *g;

    if (i == DMB_NONE)
        return DMB_ERR_GROUPS;
    if (i >= h->geo.groups)
        return DMB_ERR_CORRUPT;
    g = group(h, i);
    hd->free_groups = g->next;
    memset(g, 0, sizeof(*g));
    g->first = DMB_NONE;
    g->hash = hash;
    g->name_len = len;
    memcpy(g->name, name, len);
    g->next = *bucket;
    *bucket = i; /* links it in (I2) */
    hd->used_groups++;
    *out = i;
    return 1;
}

static void drop_group_if_empty(struct dmb_handle *h, uint32_t i)
{
    struct dmb_group *g = group(h, i);
    uint32_t *link;

    if (g->first != DMB_NONE)
        return;
    link = &group_buckets(h)[g->hash & (h->geo.group_buckets - 1)];
    for (uint32_t steps = 0; *link != i; steps++) {
        if (*link >= h->geo.groups || steps > h->geo.groups)
            return;
        link = &group(h, *link)->next;
    }
    *link = g->next;
    g->name_len = 0;
    g->next = HDR(h)->free_groups;
    HDR(h)->free_groups = i;
    HDR(h)->used_groups--;
}

/* Find the membership (g, c).  Returns 1 with *out, 0, or corrupt. */
static int find_member(struct dmb_handle *h, uint32_t g, uint32_t c,
                       uint32_t *out)
{
    uint32_t i = member_buckets(h)[member_hash(h, g, c)];

    for (uint32_t steps = 0; i != DMB_NONE; steps++) {
        struct dmb_member *m;

        if (i >= h->geo.members || steps > h->geo.members)
            return DMB_ERR_CORRUPT;
        m = member(h, i);
        if (m->group == g && m->channel == c) {
            *out = i;
            return 1;
        }
        i = m->hnext;
    }
    return 0;
}

/* Unlink a membership from its group list and hash chain, and free it.
 * Leaves an emptied group and an idle channel to the caller. */
static void remove_member(struct dmb_handle *h, uint32_t i)
{
    struct dmb_member *m = member(h, i);
    struct dmb_group *g = group(h, m->group);
    uint32_t *link = &member_buckets(h)[member_hash(h, m->group, m->channel)];

    if (m->gprev == DMB_NONE)
        g->first = m->gnext;
    else
        member(h, m->gprev)->gnext = m->gnext;
    if (m->gnext != DMB_NONE && m->gnext < h->geo.members)
        member(h, m->gnext)->gprev = m->gprev;
    for (uint32_t steps = 0; *link != DMB_NONE && *link != i; steps++) {
        if (*link >= h->geo.members || steps > h->geo.members)
            break;
        link = &member(h, *link)->hnext;
    }
    if (*link == i)
        *link = m->hnext;
    if (g->count)
        g->count--;
    if (chan(h, m->channel)->members)
        chan(h, m->channel)->members--;
    m->in_use = 0;
    m->hnext = HDR(h)->free_members;
    HDR(h)->free_members = i;
    HDR(h)->used_members--;
}

/* Remove a membership and whatever it leaves empty. */
static void remove_member_and_tidy(struct dmb_handle *h, uint32_t i)
{
    uint32_t g = member(h, i)->group;
    uint32_t c = member(h, i)->channel;

    remove_member(h, i);
    drop_group_if_empty(h, g);
    drop_channel_if_idle(h, c);
}

/* Every index remove_member follows must be in range (I4). */
static int check_member(struct dmb_handle *h, uint32_t i)
{
    struct dmb_member *m;

    if (i >= h->geo.members)
        return DMB_ERR_CORRUPT;
    m = member(h, i);
    if (m->group >= h->geo.groups || m->channel >= h->geo.channels ||
        (m->gprev != DMB_NONE && m->gprev >= h->geo.members) ||
        (m->gnext != DMB_NONE && m->gnext >= h->geo.members))
        return DMB_ERR_CORRUPT;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Attach and initialise.                                              */

static void init_free_lists(struct dmb_handle *h)
{
    struct dmb_header *hd = HDR(h);
    const struct dmb_geometry *g = &h->geo;

    for (uint32_t i = 0; i < g->channels; i++)
        chan(h, i)->next = i + 1 < g->channels ? i + 1 : DMB_NONE;
    for (uint32_t i = 0; i < g->groups; i++)
        group(h, i)->next = i + 1 < g->groups ? i + 1 : DMB_NONE;
    for (uint32_t i = 0; i < g->members; i++)
        member(h, i)->hnext = i + 1 < g->members ? i + 1 : DMB_NONE;
    for (uint32_t i = 0; i < g->nodes; i++)
        node(h, i)->next = i + 1 < g->nodes ? i + 1 : DMB_NONE;
    for (uint32_t i = 0; i < g->blocks; i++)
        block(h, i)->next = i + 1 < g->blocks ? i + 1 : DMB_NONE;
    memset(chan_buckets(h), 0xff, g->channel_buckets * sizeof(uint32_t));
    memset(group_buckets(h), 0xff, g->group_buckets * sizeof(uint32_t));
    memset(member_buckets(h), 0xff, g->member_buckets * sizeof(uint32_t));
    hd->free_channels = 0;
    hd->free_groups = 0;
    hd->free_members = 0;
    hd->free_nodes = 0;
    hd->free_blocks = 0;
}

static int fill_handle(struct dmb_handle *h, void *base, uint64_t size)
{
    memset(h, 0, sizeof(*h));
    h->base = base;
    h->size = size;
    if (dmb_geometry_for_size(size, &h->geo) != 0)
        return DMB_ERR_INVAL;
    tables_bytes(&h->geo, h->geo.blocks, h);
    return h->end <= size ? 0 : DMB_ERR_INVAL;
}

int dmb_init(struct dmb_handle *h, void *base, uint64_t size,
             uint64_t now_real_ns)
{
    struct dmb_header *hd = base;
    pthread_mutexattr_t attr;
    int rc = fill_handle(h, base, size);

    if (rc)
        return rc;
    memset(base, 0, HEADER_BYTES);
    memset(slots(h), 0, h->geo.slots * sizeof(struct dmb_slot));
    memset(chan(h, 0), 0, h->geo.channels * sizeof(struct dmb_channel));
    memset(group(h, 0), 0, h->geo.groups * sizeof(struct dmb_group));
    memset(member(h, 0), 0, h->geo.members * sizeof(struct dmb_member));
    init_free_lists(h);
    hd->version = DMB_LAYOUT_VERSION;
    hd->block_size = DMB_BLOCK_SIZE;
    hd->size = size;
    hd->created_ns = now_real_ns;
    hd->geo = h->geo;
    if (pthread_mutexattr_init(&attr) != 0)
        return DMB_ERR_LOCK;
    rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (rc == 0)
        rc = pthread_mutex_init(&hd->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc != 0)
        return DMB_ERR_LOCK;
    /* Pairs with the acquire load of magic in dmb_attach: whoever sees
     * the magic sees every store above. */
    __atomic_store_n(&hd->magic, DMB_MAGIC, __ATOMIC_RELEASE);
    return 0;
}

static int all_zero(const void *p, size_t n)
{
    const unsigned char *b = p;

    for (size_t i = 0; i < n; i++)
        if (b[i])
            return 0;
    return 1;
}

uint64_t dmb_header_size(const void *base, uint64_t mapped_size)
{
    if (mapped_size < HEADER_BYTES)
        return 0;
    return ((const struct dmb_header *)base)->size;
}

uint32_t dmb_header_version(const void *base, uint64_t mapped_size)
{
    if (mapped_size < HEADER_BYTES)
        return 0;
    return ((const struct dmb_header *)base)->version;
}

int dmb_attach(struct dmb_handle *h, void *base, uint64_t mapped_size)
{
    const struct dmb_header *hd = base;
    struct dmb_geometry g;

    if (mapped_size < HEADER_BYTES)
        return DMB_ERR_UNINIT;
    /* Pairs with the release store in dmb_init. */
    if (__atomic_load_n(&hd->magic, __ATOMIC_ACQUIRE) != DMB_MAGIC)
        return all_zero(base, HEADER_BYTES) ? DMB_ERR_UNINIT : DMB_ERR_MAGIC;
    if (hd->version != DMB_LAYOUT_VERSION ||
        hd->block_size != DMB_BLOCK_SIZE)
        return DMB_ERR_VERSION;
    if (hd->size > mapped_size)
        return DMB_ERR_SIZE;
    if (dmb_geometry_for_size(hd->size, &g) != 0 ||
        memcmp(&g, &hd->geo, sizeof(g)) != 0)
        return DMB_ERR_CORRUPT;
    return fill_handle(h, base, hd->size) == 0 ? 0 : DMB_ERR_CORRUPT;
}

/* ------------------------------------------------------------------ */
/* Slots.                                                              */

int dmb_slot_acquire(struct dmb_handle *h, int32_t pid, uint64_t start_time,
                     uint64_t token, const char *client, uint32_t client_len,
                     uint64_t now)
{
    int rc;

    if (client_len == 0 || client_len > DMB_CLIENT_MAX ||
        memchr(client, '!', client_len))
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = DMB_ERR_SLOTS;
    for (uint32_t s = 0; s < h->geo.slots; s++) {
        struct dmb_slot *sl = &slots(h)[s];

        if (sl->in_use)
            continue;
        sl->gen = ++HDR(h)->slot_gen;
        sl->pid = pid;
        sl->channels = 0;
        sl->start_time = start_time;
        sl->token = token;
        sl->attached_ns = now;
        sl->active_ns = now;
        sl->client_len = (uint8_t)client_len;
        memcpy(sl->client, client, client_len);
        sl->in_use = 1; /* last: the slot is whole before it counts */
        HDR(h)->used_slots++;
        rc = (int)s;
        break;
    }
    unlock(h);
    return rc;
}

/* Release everything a slot holds.  Lock held. */
static void release_slot_locked(struct dmb_handle *h, uint32_t s)
{
    struct dmb_header *hd = HDR(h);

    for (uint32_t i = 0; i < h->geo.channels; i++) {
        struct dmb_channel *c = chan(h, i);

        if (c->name_len == 0)
            continue;
        mask_clear(c->waiters, s);
        if (c->owner != (int32_t)s) {
            drop_channel_if_idle(h, i);
            continue;
        }
        empty_channel(h, c, &hd->counters.dropped_dead);
        c->members = 0; /* its memberships go in the sweep below */
    }
    for (uint32_t i = 0; i < h->geo.members; i++) {
        struct dmb_member *m = member(h, i);

        if (m->in_use && check_member(h, i) == 0 &&
            chan(h, m->channel)->owner == (int32_t)s)
            remove_member_and_tidy(h, i);
    }
    for (uint32_t i = 0; i < h->geo.channels; i++)
        if (chan(h, i)->name_len && chan(h, i)->owner == (int32_t)s) {
            chan(h, i)->members = 0;
            drop_channel_if_idle(h, i);
        }
    slots(h)[s].in_use = 0;
    slots(h)[s].client_len = 0;
    slots(h)[s].channels = 0;
    if (hd->used_slots)
        hd->used_slots--;
}

int dmb_slot_release(struct dmb_handle *h, uint32_t slot, uint32_t gen)
{
    int rc;

    if (slot >= h->geo.slots)
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    if (slots(h)[slot].in_use && slots(h)[slot].gen == gen)
        release_slot_locked(h, slot);
    unlock(h);
    return 0;
}

int dmb_slot_reclaim(struct dmb_handle *h, uint32_t slot, int32_t pid,
                     uint64_t start_time)
{
    struct dmb_slot *sl;
    int rc;

    if (slot >= h->geo.slots)
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    sl = &slots(h)[slot];
    rc = 0;
    if (sl->in_use && sl->pid == pid && sl->start_time == start_time) {
        release_slot_locked(h, slot);
        rc = 1;
    }
    unlock(h);
    return rc;
}

int dmb_slot_info(struct dmb_handle *h, uint32_t slot,
                  struct dmb_slot_info *out)
{
    struct dmb_slot *sl;
    uint32_t cl;

    if (slot >= h->geo.slots)
        return DMB_ERR_INVAL;
    sl = &slots(h)[slot];
    memset(out, 0, sizeof(*out));
    /* A snapshot without the lock: fields may be mid-update, so callers
     * re-check under the lock (dmb_slot_reclaim) before acting. */
    out->in_use = (int32_t)__atomic_load_n(&sl->in_use, __ATOMIC_ACQUIRE);
    out->pid = sl->pid;
    out->gen = sl->gen;
    out->channels = sl->channels;
    out->start_time = sl->start_time;
    out->token = sl->token;
    out->attached_ns = sl->attached_ns;
    out->active_ns = sl->active_ns;
    cl = sl->client_len > DMB_CLIENT_MAX ? DMB_CLIENT_MAX : sl->client_len;
    memcpy(out->client, sl->client, cl);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Send and receive.                                                   */

static int valid_name(const char *name, uint32_t len)
{
    return name != NULL && len > 0 && len < DMB_NAME_MAX;
}

static int send_locked(struct dmb_handle *h, const char *name,
                       uint32_t name_len, uint32_t capacity,
                       const void *data, uint32_t len, uint64_t now,
                       uint64_t deadline, struct dmb_wake *wake)
{
    struct dmb_header *hd = HDR(h);
    struct dmb_channel *c;
    uint32_t ci, n, rec;
    int rc = find_or_make_channel(h, name, name_len, capacity, &ci);

    if (rc == DMB_ERR_OWNER) {
        /* The receiving process is gone: the message ends here. */
        hd->counters.sent++;
        hd->counters.dropped_dead++;
        return 0;
    }
    if (rc < 0)
        return rc;
    c = chan(h, ci);
    c->capacity = capacity;
    rc = expire_head(h, c, now);
    if (rc)
        return rc;
    if (c->depth >= capacity) {
        hd->counters.refused_full++;
        return DMB_ERR_FULL;
    }
    if (!tail_ok(h, c))
        return DMB_ERR_CORRUPT;
    rc = alloc_node(h, &n);
    if (rc == 1) {
        rc = store_record(h, data, len, &rec);
        if (rc != 1)
            free_node(h, n);
    }
    if (rc != 1) {
        hd->counters.refused_nospace++;
        drop_channel_if_idle(h, ci);
        return rc == 0 ? DMB_ERR_NOSPACE : rc;
    }
    block(h, rec)->refs = 1;
    node(h, n)->record = rec;
    node(h, n)->sent_ns = now;
    node(h, n)->deadline = deadline;
    crash_here(1);
    append_node(h, c, n, len);
    crash_here(2);
    hd->counters.sent++;
    hd->counters.bytes_sent += len;
    add_waiters(wake, c);
    wake->channel = ci;
    return 0;
}

int dmb_send(struct dmb_handle *h, uint32_t slot, const char *name,
             uint32_t name_len, uint32_t capacity, const void *data,
             uint32_t len, uint64_t now, uint64_t deadline,
             struct dmb_wake *wake)
{
    int rc;

    memset(wake, 0, sizeof(*wake));
    if (!valid_name(name, name_len) || capacity == 0 || slot >= h->geo.slots)
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = send_locked(h, name, name_len, capacity, data, len, now, deadline,
                     wake);
    slots(h)[slot].active_ns = now;
    unlock(h);
    return rc;
}

/* The channel a receive (or move) takes from, with its expired head
 * messages dropped.  Returns 1 with *ci if a message waits at the head;
 * 0 if there is none (with DMB_RECV_WAIT the slot now waits on it and
 * *len is its index); DMB_ERR_OWNER for another slot's specific channel,
 * or another error. */
static int find_head(struct dmb_handle *h, uint32_t slot, const char *name,
                     uint32_t name_len, uint32_t capacity, uint64_t now,
                     uint32_t flags, uint32_t *ci, uint32_t *len)
{
    struct dmb_channel *c;
    uint64_t hash = hash_name(name, name_len);
    int rc = find_channel(h, name, name_len, hash, ci);

    if (rc == 0 && (flags & DMB_RECV_WAIT))
        rc = make_channel(h, name, name_len, hash, capacity, ci);
    if (rc <= 0)
        return rc;
    c = chan(h, *ci);
    if (c->owner >= 0 && c->owner != (int32_t)slot)
        return DMB_ERR_OWNER;
    rc = expire_head(h, c, now);
    if (rc)
        return rc;
    if (c->head != DMB_NONE)
        return 1;
    if (flags & DMB_RECV_WAIT) {
        mask_set(c->waiters, slot);
        *len = *ci;
    } else {
        drop_channel_if_idle(h, *ci);
    }
    return 0;
}

static int recv_locked(struct dmb_handle *h, uint32_t slot, const char *name,
                       uint32_t name_len, uint32_t capacity, uint64_t now,
                       uint32_t flags, void *buf, uint32_t buf_len,
                       uint32_t *len)
{
    struct dmb_header *hd = HDR(h);
    struct dmb_channel *c;
    uint32_t ci, n;
    int rc = find_head(h, slot, name, name_len, capacity, now, flags, &ci,
                       len);

    if (rc <= 0)
        return rc;
    c = chan(h, ci);
    rc = copy_record(h, node(h, c->head)->record, buf, buf_len, len);
    if (rc != 1)
        return rc;
    crash_here(3);
    rc = pop_head(h, c, &n);
    if (rc)
        return rc;
    unref_record(h, node(h, n)->record);
    free_node(h, n);
    hd->counters.received++;
    hd->counters.bytes_received += *len;
    if (flags & DMB_RECV_UNWAIT)
        mask_clear(c->waiters, slot);
    drop_channel_if_idle(h, ci);
    return 1;
}

int dmb_recv(struct dmb_handle *h, uint32_t slot, const char *name,
             uint32_t name_len, uint32_t capacity, uint64_t now,
             uint32_t flags, void *buf, uint32_t buf_len, uint32_t *len)
{
    int rc;

    *len = 0;
    if (!valid_name(name, name_len) || slot >= h->geo.slots)
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = recv_locked(h, slot, name, name_len, capacity, now, flags, buf,
                     buf_len, len);
    slots(h)[slot].active_ns = now;
    unlock(h);
    return rc;
}

int dmb_unwait(struct dmb_handle *h, uint32_t slot, const char *name,
               uint32_t name_len)
{
    uint32_t ci;
    int rc;

    if (!valid_name(name, name_len) || slot >= h->geo.slots)
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = find_channel(h, name, name_len, hash_name(name, name_len), &ci);
    if (rc == 1) {
        mask_clear(chan(h, ci)->waiters, slot);
        drop_channel_if_idle(h, ci);
        rc = 0;
    }
    unlock(h);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Groups.                                                             */

static int group_add_locked(struct dmb_handle *h, const char *gname,
                            uint32_t glen, const char *cname, uint32_t clen,
                            uint32_t capacity, uint64_t now)
{
    struct dmb_header *hd = HDR(h);
    uint64_t ghash = hash_name(gname, glen);
    uint32_t gi, ci, mi;
    struct dmb_member *m;
    int rc = find_or_make_channel(h, cname, clen, capacity, &ci);

    if (rc == DMB_ERR_OWNER)
        return 0; /* its process is gone: nothing would ever receive */
    if (rc < 0)
        return rc;
    rc = find_group(h, gname, glen, ghash, &gi);
    if (rc == 0)
        rc = make_group(h, gname, glen, ghash, &gi);
    if (rc < 0) {
        drop_channel_if_idle(h, ci);
        return rc;
    }
    rc = find_member(h, gi, ci, &mi);
    if (rc < 0)
        return rc;
    if (rc == 1) {
        member(h, mi)->joined_ns = now; /* a refresh */
        return 0;
    }
    mi = hd->free_members;
    if (mi == DMB_NONE || mi >= h->geo.members) {
        drop_group_if_empty(h, gi);
        drop_channel_if_idle(h, ci);
        return mi == DMB_NONE ? DMB_ERR_MEMBERS : DMB_ERR_CORRUPT;
    }
    m = member(h, mi);
    hd->free_members = m->hnext;
    m->group = gi;
    m->channel = ci;
    m->joined_ns = now;
    m->in_use = 1;
    m->gprev = DMB_NONE;
    m->gnext = group(h, gi)->first;
    m->hnext = member_buckets(h)[member_hash(h, gi, ci)];
    if (m->gnext != DMB_NONE && m->gnext < h->geo.members)
        member(h, m->gnext)->gprev = mi;
    group(h, gi)->first = mi; /* links it in (I2) */
    member_buckets(h)[member_hash(h, gi, ci)] = mi;
    group(h, gi)->count++;
    chan(h, ci)->members++;
    hd->used_members++;
    return 0;
}

int dmb_group_add(struct dmb_handle *h, uint32_t slot, const char *group,
                  uint32_t group_len, const char *channel,
                  uint32_t channel_len, uint32_t capacity, uint64_t now)
{
    int rc;

    if (!valid_name(group, group_len) || !valid_name(channel, channel_len) ||
        slot >= h->geo.slots || capacity == 0)
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = group_add_locked(h, group, group_len, channel, channel_len,
                          capacity, now);
    slots(h)[slot].active_ns = now;
    unlock(h);
    return rc;
}

int dmb_group_discard(struct dmb_handle *h, const char *group,
                      uint32_t group_len, const char *channel,
                      uint32_t channel_len)
{
    uint32_t gi, ci, mi;
    int rc;

    if (!valid_name(group, group_len) || !valid_name(channel, channel_len))
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = find_group(h, group, group_len, hash_name(group, group_len), &gi);
    if (rc == 1)
        rc = find_channel(h, channel, channel_len,
                          hash_name(channel, channel_len), &ci);
    if (rc == 1)
        rc = find_member(h, gi, ci, &mi);
    if (rc == 1 && check_member(h, mi) == 0)
        remove_member_and_tidy(h, mi);
    unlock(h);
    return rc < 0 ? rc : 0;
}

/* Link one record into one member's channel.  Returns 1 if delivered,
 * 0 if the channel was full, DMB_ERR_NOSPACE if no node was free. */
static int deliver(struct dmb_handle *h, struct dmb_channel *c, uint32_t rec,
                   uint32_t len, uint64_t now, uint64_t deadline)
{
    uint32_t n;
    int rc = expire_head(h, c, now);

    if (rc)
        return rc;
    if (c->depth >= c->capacity)
        return 0;
    if (!tail_ok(h, c))
        return DMB_ERR_CORRUPT;
    rc = alloc_node(h, &n);
    if (rc != 1)
        return rc == 0 ? DMB_ERR_NOSPACE : rc;
    node(h, n)->record = rec;
    node(h, n)->sent_ns = now;
    node(h, n)->deadline = deadline;
    block(h, rec)->refs++;
    append_node(h, c, n, len);
    return 1;
}

static int group_send_locked(struct dmb_handle *h, const char *gname,
                             uint32_t glen, const void *data, uint32_t len,
                             uint64_t now, uint64_t deadline,
                             uint64_t group_expiry_ns, uint32_t *full,
                             uint32_t *nospace, struct dmb_wake *wake)
{
    struct dmb_header *hd = HDR(h);
    uint32_t gi, mi, rec = DMB_NONE, delivered = 0;
    int rc = find_group(h, gname, glen, hash_name(gname, glen), &gi);

    hd->counters.group_sends++;
    if (rc <= 0)
        return rc;
    if (group(h, gi)->first != DMB_NONE) {
        rc = store_record(h, data, len, &rec);
        if (rc < 0)
            return rc;
        if (rc == 0)
            rec = DMB_NONE;
    }
    mi = group(h, gi)->first;
    for (uint32_t steps = 0; mi != DMB_NONE; steps++) {
        struct dmb_member *m;
        uint32_t next;

        if (mi >= h->geo.members || steps > h->geo.members ||
            check_member(h, mi))
            return DMB_ERR_CORRUPT;
        m = member(h, mi);
        next = m->gnext;
        if (now - m->joined_ns > group_expiry_ns && now > m->joined_ns) {
            uint32_t c = m->channel;

            remove_member(h, mi); /* the group stays: we walk it */
            drop_channel_if_idle(h, c);
            mi = next;
            continue;
        }
        hd->counters.sent++;
        rc = rec == DMB_NONE ? DMB_ERR_NOSPACE
                             : deliver(h, chan(h, m->channel), rec, len, now,
                                       deadline);
        if (rc == 1) {
            delivered++;
            add_waiters(wake, chan(h, m->channel));
        } else if (rc == 0) {
            (*full)++;
            hd->counters.dropped_full++;
        } else if (rc == DMB_ERR_NOSPACE) {
            (*nospace)++;
            hd->counters.dropped_full++;
        } else {
            return rc;
        }
        crash_here(4);
        mi = next;
    }
    if (rec != DMB_NONE && block(h, rec)->refs == 0)
        free_record(h, rec);
    hd->counters.bytes_sent += (uint64_t)len * delivered;
    drop_group_if_empty(h, gi);
    return (int)delivered;
}

int dmb_group_send(struct dmb_handle *h, const char *group,
                   uint32_t group_len, const void *data, uint32_t len,
                   uint64_t now, uint64_t deadline, uint64_t group_expiry_ns,
                   uint32_t *full, uint32_t *nospace, struct dmb_wake *wake)
{
    int rc;

    memset(wake, 0, sizeof(*wake));
    wake->channel = DMB_NONE;
    *full = 0;
    *nospace = 0;
    if (!valid_name(group, group_len))
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = group_send_locked(h, group, group_len, data, len, now, deadline,
                           group_expiry_ns, full, nospace, wake);
    unlock(h);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Whole-segment operations.                                           */

int dmb_flush(struct dmb_handle *h)
{
    struct dmb_header *hd;
    int rc = lock(h);

    if (rc)
        return rc;
    hd = HDR(h);
    for (uint32_t i = 0; i < h->geo.members; i++)
        if (member(h, i)->in_use && check_member(h, i) == 0)
            remove_member_and_tidy(h, i);
    for (uint32_t i = 0; i < h->geo.channels; i++) {
        if (chan(h, i)->name_len == 0)
            continue;
        empty_channel(h, chan(h, i), &hd->counters.flushed);
        drop_channel_if_idle(h, i); /* keeps channels with waiters */
    }
    unlock(h);
    return 0;
}

int dmb_expire(struct dmb_handle *h, uint64_t now, uint64_t group_expiry_ns)
{
    uint64_t before;
    int rc = lock(h);

    if (rc)
        return rc;
    before = HDR(h)->counters.expired;
    for (uint32_t i = 0; i < h->geo.members; i++) {
        struct dmb_member *m = member(h, i);

        if (m->in_use && check_member(h, i) == 0 && now > m->joined_ns &&
            now - m->joined_ns > group_expiry_ns)
            remove_member_and_tidy(h, i);
    }
    for (uint32_t i = 0; i < h->geo.channels; i++) {
        if (chan(h, i)->name_len == 0)
            continue;
        expire_head(h, chan(h, i), now);
        drop_channel_if_idle(h, i);
    }
    rc = (int)(HDR(h)->counters.expired - before);
    unlock(h);
    return rc;
}

int dmb_purge(struct dmb_handle *h, const char *name, uint32_t name_len)
{
    uint32_t ci;
    int rc;

    if (!valid_name(name, name_len))
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = find_channel(h, name, name_len, hash_name(name, name_len), &ci);
    if (rc == 1) {
        uint64_t before = HDR(h)->counters.flushed;

        rc = empty_channel(h, chan(h, ci), &HDR(h)->counters.flushed);
        if (rc == 0)
            rc = (int)(HDR(h)->counters.flushed - before);
        drop_channel_if_idle(h, ci);
    }
    unlock(h);
    return rc;
}

int dmb_stats(struct dmb_handle *h, struct dmb_stats *out)
{
    struct dmb_header *hd = HDR(h);
    int rc = lock(h);

    if (rc)
        return rc;
    memset(out, 0, sizeof(*out));
    out->size = hd->size;
    out->created_ns = hd->created_ns;
    out->version = hd->version;
    out->block_size = hd->block_size;
    out->geometry = h->geo;
    out->used_slots = hd->used_slots;
    out->used_channels = hd->used_channels;
    out->used_groups = hd->used_groups;
    out->used_members = hd->used_members;
    out->used_nodes = hd->used_nodes;
    out->used_blocks = hd->used_blocks;
    out->peak_blocks = hd->peak_blocks;
    out->queued = hd->queued;
    out->counters = hd->counters;
    unlock(h);
    return 0;
}

int dmb_channel_at(struct dmb_handle *h, uint32_t index,
                   struct dmb_channel_info *out)
{
    struct dmb_channel *c;
    int rc;

    if (index >= h->geo.channels)
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    c = chan(h, index);
    rc = 0;
    if (c->name_len > 0 && c->name_len < DMB_NAME_MAX) {
        memset(out, 0, sizeof(*out));
        out->depth = c->depth;
        out->capacity = c->capacity;
        out->members = c->members;
        out->owner = c->owner;
        out->bytes = c->bytes;
        if (c->head < h->geo.nodes)
            out->oldest_ns = node(h, c->head)->sent_ns;
        out->waiters[0] = c->waiters[0];
        out->waiters[1] = c->waiters[1];
        memcpy(out->name, c->name, c->name_len);
        rc = 1;
    }
    unlock(h);
    return rc;
}

int dmb_group_at(struct dmb_handle *h, uint32_t index,
                 struct dmb_group_info *out)
{
    struct dmb_group *g;
    int rc;

    if (index >= h->geo.groups)
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    g = group(h, index);
    rc = 0;
    if (g->name_len > 0 && g->name_len < DMB_NAME_MAX) {
        memset(out, 0, sizeof(*out));
        out->members = g->count;
        memcpy(out->name, g->name, g->name_len);
        rc = 1;
    }
    unlock(h);
    return rc;
}

int dmb_group_members(struct dmb_handle *h, const char *gname,
                      uint32_t group_len, uint32_t start,
                      struct dmb_member_info *out, uint32_t n)
{
    uint32_t gi, mi, pos = 0, written = 0;
    int rc;

    if (!valid_name(gname, group_len))
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = find_group(h, gname, group_len, hash_name(gname, group_len), &gi);
    mi = rc == 1 ? group(h, gi)->first : DMB_NONE;
    for (uint32_t steps = 0; mi != DMB_NONE && written < n; steps++) {
        struct dmb_member *m;
        struct dmb_channel *c;

        if (mi >= h->geo.members || steps > h->geo.members ||
            check_member(h, mi)) {
            rc = DMB_ERR_CORRUPT;
            break;
        }
        m = member(h, mi);
        c = chan(h, m->channel);
        if (pos++ >= start && c->name_len < DMB_NAME_MAX) {
            memset(&out[written], 0, sizeof(out[written]));
            out[written].joined_ns = m->joined_ns;
            memcpy(out[written].channel, c->name, c->name_len);
            written++;
        }
        mi = m->gnext;
    }
    unlock(h);
    return rc < 0 ? rc : (int)written;
}

int dmb_peek(struct dmb_handle *h, const char *name, uint32_t name_len,
             uint32_t pos, void *buf, uint32_t buf_len, uint32_t *len,
             uint64_t *sent_ns)
{
    uint32_t ci, n;
    int rc;

    *len = 0;
    if (!valid_name(name, name_len))
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = find_channel(h, name, name_len, hash_name(name, name_len), &ci);
    n = rc == 1 ? chan(h, ci)->head : DMB_NONE;
    for (uint32_t k = 0; rc == 1 && k < pos && n != DMB_NONE; k++)
        n = n < h->geo.nodes ? node(h, n)->next : DMB_NONE;
    if (rc == 1 && n == DMB_NONE)
        rc = 0;
    if (rc == 1 && n >= h->geo.nodes)
        rc = DMB_ERR_CORRUPT;
    if (rc == 1) {
        *sent_ns = node(h, n)->sent_ns;
        rc = copy_record(h, node(h, n)->record, buf, buf_len, len);
    }
    unlock(h);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Repair: walk from the roots, keep what is sound, rebuild the rest.   */

/* MARK_DROPPED: seen and rejected, so a damaged cycle ends the walk. */
enum { MARK_FREE = 0, MARK_USED = 1, MARK_RECORD = 2, MARK_DROPPED = 3 };

static int marked_kept(unsigned char m)
{
    return m == MARK_USED || m == MARK_RECORD;
}

static unsigned char *mark_channels(struct dmb_handle *h)
{
    return marks(h);
}

static unsigned char *mark_groups(struct dmb_handle *h)
{
    return mark_channels(h) + h->geo.channels;
}

static unsigned char *mark_members(struct dmb_handle *h)
{
    return mark_groups(h) + h->geo.groups;
}

static unsigned char *mark_nodes(struct dmb_handle *h)
{
    return mark_members(h) + h->geo.members;
}

static unsigned char *mark_blocks(struct dmb_handle *h)
{
    return mark_nodes(h) + h->geo.nodes;
}

/* Is rec the head of a sound record?  Marks its blocks on first sight,
 * counts one more reference after that (I3). */
static int keep_record(struct dmb_handle *h, uint32_t rec)
{
    unsigned char *mb = mark_blocks(h);
    uint32_t n, i = rec;

    if (rec >= h->geo.blocks)
        return 0;
    if (mb[rec] == MARK_RECORD) {
        block(h, rec)->refs++;
        return 1;
    }
    if (mb[rec] != MARK_FREE)
        return 0;
    n = blocks_for(block(h, rec)->len);
    if (block(h, rec)->len > (uint64_t)h->geo.blocks * BLOCK_PAYLOAD)
        return 0;
    for (uint32_t k = 0; k < n; k++) {
        if (i >= h->geo.blocks || mb[i] != MARK_FREE) {
            for (uint32_t j = rec, u = 0; u < k; u++) { /* undo */
                mb[j] = MARK_FREE;
                j = block(h, j)->next;
            }
            return 0;
        }
        mb[i] = k == 0 ? MARK_RECORD : MARK_USED;
        i = block(h, i)->next;
    }
    block(h, rec)->refs = 1;
    return 1;
}

/* Keep the sound prefix of a channel's queue; recompute what derives. */
static void repair_queue(struct dmb_handle *h, struct dmb_channel *c)
{
    unsigned char *mn = mark_nodes(h);
    uint32_t *link = &c->head;

    c->depth = 0;
    c->bytes = 0;
    c->tail = DMB_NONE;
    while (*link != DMB_NONE) {
        uint32_t n = *link;

        if (n >= h->geo.nodes || mn[n] || !keep_record(h, node(h, n)->record)) {
            *link = DMB_NONE;
            break;
        }
        mn[n] = MARK_USED;
        c->depth++;
        c->bytes += block(h, node(h, n)->record)->len;
        c->tail = n;
        link = &node(h, n)->next;
    }
    HDR(h)->queued += c->depth;
}

static void repair_channels(struct dmb_handle *h)
{
    unsigned char *mc = mark_channels(h);
    uint32_t nb = h->geo.channel_buckets;

    for (uint32_t b = 0; b < nb; b++) {
        uint32_t *link = &chan_buckets(h)[b];

        while (*link != DMB_NONE) {
            uint32_t i = *link;
            struct dmb_channel *c;

            if (i >= h->geo.channels || mc[i]) {
                *link = DMB_NONE;
                break;
            }
            c = chan(h, i);
            if (c->name_len == 0 || c->name_len >= DMB_NAME_MAX ||
                c->hash != hash_name(c->name, c->name_len) ||
                (c->hash & (nb - 1)) != b) {
                *link = c->next; /* drop this entry, keep walking */
                c->name_len = 0;
                mc[i] = MARK_DROPPED;
                continue;
            }
            mc[i] = MARK_USED;
            if (c->owner >= (int32_t)h->geo.slots ||
                (c->owner >= 0 && !slots(h)[c->owner].in_use))
                c->owner = -1;
            if (c->owner >= 0)
                slots(h)[c->owner].channels++;
            for (uint32_t s = 0; s < h->geo.slots; s++)
                if (!slots(h)[s].in_use)
                    mask_clear(c->waiters, s);
            c->members = 0;
            repair_queue(h, c);
            link = &c->next;
        }
    }
}

/* Keep a group's sound members; rebuild back links and counts. */
static void repair_group(struct dmb_handle *h, uint32_t gi)
{
    unsigned char *mm = mark_members(h), *mc = mark_channels(h);
    struct dmb_group *g = group(h, gi);
    uint32_t *link = &g->first, prev = DMB_NONE;

    g->count = 0;
    while (*link != DMB_NONE) {
        uint32_t i = *link;
        struct dmb_member *m;

        if (i >= h->geo.members || mm[i]) {
            *link = DMB_NONE;
            break;
        }
        m = member(h, i);
        if (m->group != gi || m->channel >= h->geo.channels ||
            !marked_kept(mc[m->channel])) {
            *link = m->gnext;
            mm[i] = MARK_DROPPED;
            continue;
        }
        mm[i] = MARK_USED;
        m->in_use = 1;
        m->gprev = prev;
        m->hnext = member_buckets(h)[member_hash(h, gi, m->channel)];
        member_buckets(h)[member_hash(h, gi, m->channel)] = i;
        chan(h, m->channel)->members++;
        g->count++;
        prev = i;
        link = &m->gnext;
    }
}

static void repair_groups(struct dmb_handle *h)
{
    unsigned char *mg = mark_groups(h);
    uint32_t nb = h->geo.group_buckets;

    memset(member_buckets(h), 0xff,
           h->geo.member_buckets * sizeof(uint32_t));
    for (uint32_t b = 0; b < nb; b++) {
        uint32_t *link = &group_buckets(h)[b];

        while (*link != DMB_NONE) {
            uint32_t i = *link;
            struct dmb_group *g;

            if (i >= h->geo.groups || mg[i]) {
                *link = DMB_NONE;
                break;
            }
            g = group(h, i);
            if (g->name_len == 0 || g->name_len >= DMB_NAME_MAX ||
                g->hash != hash_name(g->name, g->name_len) ||
                (g->hash & (nb - 1)) != b) {
                *link = g->next;
                g->name_len = 0;
                mg[i] = MARK_DROPPED;
                continue;
            }
            repair_group(h, i);
            if (g->count == 0) {
                *link = g->next;
                g->name_len = 0;
                mg[i] = MARK_DROPPED;
                continue;
            }
            mg[i] = MARK_USED;
            link = &g->next;
        }
    }
}

/* Put every unmarked entry of every table back on its free list. */
static void rebuild_free_lists(struct dmb_handle *h)
{
    struct dmb_header *hd = HDR(h);
    const struct dmb_geometry *g = &h->geo;

#define REBUILD(count, mark, entry, link, free_head, used, on_free)        \
    do {                                                                   \
        hd->free_head = DMB_NONE;                                          \
        hd->used = 0;                                                      \
        for (uint32_t i = (count); i-- > 0;) {                             \
            if (marked_kept((mark)[i])) {                                  \
                hd->used++;                                                \
                continue;                                                  \
            }                                                              \
            on_free;                                                       \
            entry(h, i)->link = hd->free_head;                             \
            hd->free_head = i;                                             \
        }                                                                  \
    } while (0)
    REBUILD(g->channels, mark_channels(h), chan, next, free_channels,
            used_channels, chan(h, i)->name_len = 0);
    REBUILD(g->groups, mark_groups(h), group, next, free_groups, used_groups,
            group(h, i)->name_len = 0);
    REBUILD(g->members, mark_members(h), member, hnext, free_members,
            used_members, member(h, i)->in_use = 0);
    REBUILD(g->nodes, mark_nodes(h), node, next, free_nodes, used_nodes,
            (void)0);
    REBUILD(g->blocks, mark_blocks(h), block, next, free_blocks, used_blocks,
            block(h, i)->refs = 0);
#undef REBUILD
    if (hd->peak_blocks < hd->used_blocks)
        hd->peak_blocks = hd->used_blocks;
}

/* Restore the accounting identity of struct dmb_counters.  A holder that
 * died between linking a message and counting it (or between taking one
 * and counting it received) leaves it off by the messages in flight; so
 * does damage that repair cut away.  A message queued but not counted
 * sent is counted sent now; one counted sent that is neither queued nor
 * counted anywhere else went with a dead process: dropped_dead.  On a
 * sound segment this changes nothing. */
static void reconcile_counters(struct dmb_handle *h)
{
    struct dmb_counters *c = &HDR(h)->counters;
    uint64_t ended = c->received + c->expired + c->dropped_full +
                     c->dropped_dead + c->flushed + HDR(h)->queued;

    if (c->sent > ended)
        c->dropped_dead += c->sent - ended;
    else
        c->sent = ended;
}

static void repair_move(struct dmb_handle *h);

static void repair_locked(struct dmb_handle *h)
{
    struct dmb_header *hd = HDR(h);
    const struct dmb_geometry *g = &h->geo;

    memset(marks(h), 0,
           (size_t)g->channels + g->groups + g->members + g->nodes +
               g->blocks);
    hd->used_slots = 0;
    for (uint32_t s = 0; s < g->slots; s++) {
        struct dmb_slot *sl = &slots(h)[s];

        if (sl->in_use != 1 || sl->client_len == 0 ||
            sl->client_len > DMB_CLIENT_MAX) {
            sl->in_use = 0;
            sl->client_len = 0;
        }
        sl->channels = 0;
        hd->used_slots += sl->in_use;
    }
    hd->queued = 0;
    repair_channels(h);
    repair_move(h); /* before anything unreached is freed */
    repair_groups(h);
    rebuild_free_lists(h);
    reconcile_counters(h);
}

int dmb_repair(struct dmb_handle *h)
{
    int rc = lock(h);

    if (rc)
        return rc;
    repair_locked(h);
    HDR(h)->counters.repairs++;
    unlock(h);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Moving messages between channels (dmb/kombu.py's acknowledgements).  */
/*
 * A consumer that acknowledges takes a message by moving it from its
 * queue into a pending channel of its own, in one locked step, and later
 * settles it by reference: dropped once acknowledged, moved back when
 * rejected.  Whoever finds the consumer's process dead moves the rest of
 * its pending channel back to the queue.  Pending channels are plain
 * channels, so dmb_repair walks them like any other.
 *
 * A move unlinks a node from one queue and links the same node into
 * another: two stores.  A holder killed between them would leave the
 * node on neither queue, a lost message (I2's leaked entry), so the move
 * is first written into the header (move_node, move_dst) and
 * repair_move finishes a move it finds cut short.  A message is thus in
 * exactly one channel at every instant: never lost, never doubled.
 */

/* A compiler barrier: no store moves across it, so a process killed at
 * any instruction has made its stores in program order.  The robust
 * mutex publishes them to the process that repairs (its EOWNERDEAD
 * acquire pairs with the dead holder's last stores). */
#define STEP() __atomic_signal_fence(__ATOMIC_SEQ_CST)

/* Unlink node n, whose predecessor in c's queue is prev (DMB_NONE for
 * the head), and update what derives from the links.  The caller has
 * checked n and its record (I4). */
static void unlink_node(struct dmb_handle *h, struct dmb_channel *c,
                        uint32_t prev, uint32_t n)
{
    uint32_t len = block(h, node(h, n)->record)->len;

    if (prev == DMB_NONE)
        c->head = node(h, n)->next; /* unlinks it (I2) */
    else
        node(h, prev)->next = node(h, n)->next; /* unlinks it (I2) */
    if (c->tail == n)
        c->tail = prev;
    if (c->depth)
        c->depth--;
    c->bytes -= c->bytes < len ? c->bytes : len;
    if (HDR(h)->queued)
        HDR(h)->queued--;
}

/* Move node n (after prev in src) to the tail of channel di, whose tail
 * the caller has checked.  The node is stamped no earlier than now and
 * later than di's tail, so (node, stamp) names this delivery alone. */
static void transfer(struct dmb_handle *h, struct dmb_channel *src,
                     uint32_t prev, uint32_t n, uint32_t di, uint64_t now)
{
    struct dmb_header *hd = HDR(h);
    struct dmb_channel *dst = chan(h, di);
    uint64_t stamp = now;

    if (dst->head != DMB_NONE && node(h, dst->tail)->sent_ns >= stamp)
        stamp = node(h, dst->tail)->sent_ns + 1;
    hd->move_dst = di;
    STEP();
    hd->move_node = n + 1; /* from here on, repair_move finishes it */
    STEP();
    unlink_node(h, src, prev, n);
    STEP();
    crash_here(11);
    node(h, n)->sent_ns = stamp;
    append_node(h, dst, n, block(h, node(h, n)->record)->len);
    STEP();
    hd->move_node = 0;
}

/* Finish a move whose process died inside transfer(): a node in flight
 * that the walk of repair_channels reached from no queue goes to the
 * tail of its destination.  Runs before the free lists are rebuilt. */
static void repair_move(struct dmb_handle *h)
{
    struct dmb_header *hd = HDR(h);
    uint32_t n = hd->move_node - 1, di = hd->move_dst;

    hd->move_node = 0;
    if (n >= h->geo.nodes || mark_nodes(h)[n] != MARK_FREE ||
        di >= h->geo.channels || !marked_kept(mark_channels(h)[di]) ||
        !keep_record(h, node(h, n)->record))
        return;
    mark_nodes(h)[n] = MARK_USED;
    append_node(h, chan(h, di), n, block(h, node(h, n)->record)->len);
}

/* Find or make the destination of a move of node n out of channel ci:
 * its index in *di, and 0, or DMB_ERR_FULL at capacity, or what
 * find_or_make_channel returns.  A destination that is the source, or
 * whose tail is n itself (damage: two queues sharing a node), is
 * DMB_ERR_CORRUPT, since unlinking n would leave its tail dangling. */
static int open_dst(struct dmb_handle *h, const char *dst, uint32_t dst_len,
                    uint32_t capacity, uint32_t ci, uint32_t n, uint32_t *di)
{
    struct dmb_channel *d;
    int rc = find_or_make_channel(h, dst, dst_len, capacity, di);

    if (rc < 0)
        return rc;
    d = chan(h, *di);
    d->capacity = capacity;
    if (d->depth >= capacity) {
        drop_channel_if_idle(h, *di);
        return DMB_ERR_FULL;
    }
    if (*di == ci || (d->head != DMB_NONE && d->tail == n))
        return DMB_ERR_CORRUPT;
    return tail_ok(h, d) ? 0 : DMB_ERR_CORRUPT;
}

static int move_locked(struct dmb_handle *h, uint32_t slot, const char *src,
                       uint32_t src_len, const char *dst, uint32_t dst_len,
                       uint32_t capacity, uint64_t now, uint32_t flags,
                       void *buf, uint32_t buf_len, uint32_t *len,
                       struct dmb_ref *ref, struct dmb_wake *wake)
{
    struct dmb_channel *c;
    uint32_t ci, di, n;
    int rc = find_head(h, slot, src, src_len, capacity, now, flags, &ci, len);

    if (rc <= 0)
        return rc;
    c = chan(h, ci);
    n = c->head;
    if (n >= h->geo.nodes || node(h, n)->record >= h->geo.blocks)
        return DMB_ERR_CORRUPT;
    *len = block(h, node(h, n)->record)->len;
    if (buf != NULL) {
        rc = copy_record(h, node(h, n)->record, buf, buf_len, len);
        if (rc != 1)
            return rc;
    }
    rc = open_dst(h, dst, dst_len, capacity, ci, n, &di);
    if (rc)
        return rc;
    transfer(h, c, DMB_NONE, n, di, now);
    ref->node = n;
    ref->stamp = node(h, n)->sent_ns;
    if (flags & DMB_RECV_UNWAIT)
        mask_clear(c->waiters, slot);
    add_waiters(wake, chan(h, di));
    wake->channel = di;
    drop_channel_if_idle(h, ci);
    return 1;
}

int dmb_move(struct dmb_handle *h, uint32_t slot, const char *src,
             uint32_t src_len, const char *dst, uint32_t dst_len,
             uint32_t capacity, uint64_t now, uint32_t flags, void *buf,
             uint32_t buf_len, uint32_t *len, struct dmb_ref *ref,
             struct dmb_wake *wake)
{
    int rc;

    memset(wake, 0, sizeof(*wake));
    memset(ref, 0, sizeof(*ref));
    *len = 0;
    if (!valid_name(src, src_len) || !valid_name(dst, dst_len) ||
        names_equal(src, src_len, dst, dst_len) || capacity == 0 ||
        slot >= h->geo.slots)
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = move_locked(h, slot, src, src_len, dst, dst_len, capacity, now,
                     flags, buf, buf_len, len, ref, wake);
    slots(h)[slot].active_ns = now;
    unlock(h);
    return rc;
}

/* Find the node holding ref in c's queue, and its predecessor in *prev.
 * Returns 1, 0 if it is not there, or DMB_ERR_CORRUPT. */
static int find_ref(struct dmb_handle *h, const struct dmb_channel *c,
                    const struct dmb_ref *ref, uint32_t *prev)
{
    uint32_t p = DMB_NONE, n = c->head;

    for (uint32_t steps = 0; n != DMB_NONE; steps++) {
        if (n >= h->geo.nodes || steps > h->geo.nodes)
            return DMB_ERR_CORRUPT;
        if (n == ref->node && node(h, n)->sent_ns == ref->stamp) {
            if (node(h, n)->record >= h->geo.blocks)
                return DMB_ERR_CORRUPT;
            *prev = p;
            return 1;
        }
        p = n;
        n = node(h, n)->next;
    }
    return 0;
}

static int settle_locked(struct dmb_handle *h, const char *name,
                         uint32_t name_len, const struct dmb_ref *ref,
                         const char *dst, uint32_t dst_len,
                         uint32_t capacity, uint64_t now,
                         struct dmb_wake *wake)
{
    struct dmb_counters *counters = &HDR(h)->counters;
    uint32_t ci, di, prev, n = ref->node;
    int rc = find_channel(h, name, name_len, hash_name(name, name_len), &ci);

    if (rc == 1)
        rc = find_ref(h, chan(h, ci), ref, &prev);
    if (rc != 1)
        return rc;
    if (dst == NULL) {
        uint32_t rec = node(h, n)->record;

        unlink_node(h, chan(h, ci), prev, n);
        counters->received++;
        counters->bytes_received += block(h, rec)->len;
        unref_record(h, rec);
        free_node(h, n);
    } else {
        rc = open_dst(h, dst, dst_len, capacity, ci, n, &di);
        if (rc)
            return rc;
        transfer(h, chan(h, ci), prev, n, di, now);
        add_waiters(wake, chan(h, di));
        wake->channel = di;
    }
    drop_channel_if_idle(h, ci);
    return 1;
}

int dmb_settle(struct dmb_handle *h, uint32_t slot, const char *name,
               uint32_t name_len, const struct dmb_ref *ref, const char *dst,
               uint32_t dst_len, uint32_t capacity, uint64_t now,
               struct dmb_wake *wake)
{
    int rc;

    memset(wake, 0, sizeof(*wake));
    if (!valid_name(name, name_len) || slot >= h->geo.slots ||
        (dst != NULL && (!valid_name(dst, dst_len) || capacity == 0 ||
                         names_equal(name, name_len, dst, dst_len))))
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = settle_locked(h, name, name_len, ref, dst, dst_len, capacity, now,
                       wake);
    slots(h)[slot].active_ns = now;
    unlock(h);
    return rc;
}

/* Does record rec hold exactly these len bytes?  Checks every block
 * index it follows (I4). */
static int record_equals(struct dmb_handle *h, uint32_t rec,
                         const unsigned char *data, uint32_t len)
{
    uint32_t i = rec;

    if (rec >= h->geo.blocks || block(h, rec)->len != len)
        return 0;
    for (uint32_t k = blocks_for(len); k > 0; k--) {
        uint32_t chunk = len > BLOCK_PAYLOAD ? BLOCK_PAYLOAD : len;

        if (i >= h->geo.blocks || memcmp(block(h, i)->data, data, chunk))
            return 0;
        data += chunk;
        len -= chunk;
        i = block(h, i)->next;
    }
    return 1;
}

static int remove_locked(struct dmb_handle *h, uint32_t ci,
                         const void *data, uint32_t len)
{
    struct dmb_channel *c = chan(h, ci);
    uint32_t prev = DMB_NONE, n = c->head;

    for (uint32_t steps = 0; n != DMB_NONE; steps++) {
        uint32_t rec;

        if (n >= h->geo.nodes || steps > h->geo.nodes)
            return DMB_ERR_CORRUPT;
        rec = node(h, n)->record;
        if (record_equals(h, rec, data, len)) {
            unlink_node(h, c, prev, n);
            unref_record(h, rec);
            free_node(h, n);
            HDR(h)->counters.flushed++;
            drop_channel_if_idle(h, ci);
            return 1;
        }
        prev = n;
        n = node(h, n)->next;
    }
    return 0;
}

int dmb_remove(struct dmb_handle *h, const char *name, uint32_t name_len,
               const void *data, uint32_t len)
{
    uint32_t ci;
    int rc;

    if (!valid_name(name, name_len) || (data == NULL && len > 0))
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = find_channel(h, name, name_len, hash_name(name, name_len), &ci);
    if (rc == 1)
        rc = remove_locked(h, ci, data, len);
    unlock(h);
    return rc;
}

int dmb_channel_find(struct dmb_handle *h, const char *name,
                     uint32_t name_len, struct dmb_channel_info *out)
{
    uint32_t ci;
    int rc;

    if (!valid_name(name, name_len))
        return DMB_ERR_INVAL;
    rc = lock(h);
    if (rc)
        return rc;
    rc = find_channel(h, name, name_len, hash_name(name, name_len), &ci);
    unlock(h);
    if (rc != 1)
        return rc;
    rc = dmb_channel_at(h, ci, out);
    /* The entry may have been freed and reused between the two locks. */
    if (rc == 1 && (memcmp(out->name, name, name_len) != 0 ||
                    out->name[name_len] != '\0'))
        rc = 0;
    return rc;
}

int dmb_channel_scan(struct dmb_handle *h, uint32_t *pos, const char *prefix,
                     uint32_t prefix_len, uint32_t max_steps)
{
    uint32_t i = *pos, end;
    int rc;

    if ((prefix == NULL && prefix_len > 0) || prefix_len >= DMB_NAME_MAX)
        return DMB_ERR_INVAL;
    if (i >= h->geo.channels)
        return 0;
    end = h->geo.channels - i > max_steps ? i + max_steps : h->geo.channels;
    rc = lock(h);
    if (rc)
        return rc;
    for (rc = 0; i < end && rc == 0; i++) {
        const struct dmb_channel *c = chan(h, i);

        rc = c->name_len > 0 && c->name_len < DMB_NAME_MAX &&
             c->name_len >= prefix_len &&
             memcmp(c->name, prefix, prefix_len) == 0;
    }
    unlock(h);
    *pos = rc ? i - 1 : i;
    return rc;
}
