/*
 * test_ring.c - C tests of dmb's segment, one per function below.
 *
 *   test_ring NAME     runs one test; exit status 0 when it passed
 *   test_ring --list   names them (CMakeLists.txt registers each)
 *
 * Segments live in anonymous shared mappings, so a forked child works on
 * the same bytes as its parent, as two processes on a named segment do.
 */
#define _GNU_SOURCE
#include "_ring.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define SEG_SIZE (2u << 20)
#define NO_EXPIRY UINT64_MAX
#define DAY_NS (86400ull * 1000000000ull)

static int failures;

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__,         \
                    __LINE__, #cond);                                      \
            failures++;                                                    \
        }                                                                  \
    } while (0)

#define CHECK_EQ(a, b)                                                     \
    do {                                                                   \
        long long a_ = (long long)(a), b_ = (long long)(b);                \
        if (a_ != b_) {                                                    \
            fprintf(stderr, "%s:%d: %s == %lld, expected %s == %lld\n",    \
                    __FILE__, __LINE__, #a, a_, #b, b_);                   \
            failures++;                                                    \
        }                                                                  \
    } while (0)

struct seg {
    struct dmb_handle h;
    void *base;
    uint64_t size;
    int slot;
};

static void seg_open(struct seg *s, uint64_t size)
{
    s->size = size;
    s->base = mmap(NULL, size, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (s->base == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    if (dmb_init(&s->h, s->base, size, 1) != 0) {
        fprintf(stderr, "dmb_init failed\n");
        exit(2);
    }
    s->slot = dmb_slot_acquire(&s->h, 100, 1, 7, "clientA", 7, 0);
}

static void seg_close(struct seg *s)
{
    munmap(s->base, s->size);
}

static int send_str(struct seg *s, const char *ch, const char *msg,
                    uint32_t cap, uint64_t now, uint64_t deadline)
{
    struct dmb_wake w;

    return dmb_send(&s->h, (uint32_t)s->slot, ch, (uint32_t)strlen(ch), cap,
                    msg, (uint32_t)strlen(msg), now, deadline, &w);
}

/* Receive into a static buffer; returns dmb_recv's result. */
static char rbuf[1 << 21];
static uint32_t rlen;

static int recv_at(struct seg *s, int slot, const char *ch, uint64_t now)
{
    int rc = dmb_recv(&s->h, (uint32_t)slot, ch, (uint32_t)strlen(ch), 100,
                      now, 0, rbuf, sizeof(rbuf) - 1, &rlen);

    if (rc == 1)
        rbuf[rlen] = 0;
    return rc;
}

static int recv_str(struct seg *s, const char *ch)
{
    return recv_at(s, s->slot, ch, 0);
}

static struct dmb_stats stats(struct seg *s)
{
    struct dmb_stats st;

    dmb_stats(&s->h, &st);
    return st;
}

/* sent = received + expired + dropped_full + dropped_dead + flushed +
 * queued, the identity every test ends by checking. */
static void check_accounting(struct seg *s)
{
    struct dmb_stats st = stats(s);
    struct dmb_counters *c = &st.counters;

    CHECK_EQ(c->sent, c->received + c->expired + c->dropped_full +
                          c->dropped_dead + c->flushed + st.queued);
}

/* ------------------------------------------------------------------ */

static void test_init_and_attach(void)
{
    struct seg s;
    struct dmb_handle h2;

    seg_open(&s, SEG_SIZE);
    CHECK(s.slot >= 0);
    CHECK_EQ(dmb_attach(&h2, s.base, s.size), 0);
    CHECK_EQ(h2.geo.channels, s.h.geo.channels);
    CHECK_EQ(h2.off_blocks, s.h.off_blocks);
    CHECK(h2.end <= s.size);
    CHECK_EQ(stats(&s).used_slots, 1);
    seg_close(&s);
}

static void test_attach_rejects_bad_headers(void)
{
    struct seg s;
    struct dmb_handle h2;
    uint32_t version;

    seg_open(&s, SEG_SIZE);
    CHECK_EQ(dmb_attach(&h2, s.base, 100), DMB_ERR_UNINIT);
    CHECK_EQ(dmb_attach(&h2, s.base, s.size / 2), DMB_ERR_SIZE);
    memcpy(&version, (char *)s.base + 8, 4);
    version++;
    memcpy((char *)s.base + 8, &version, 4);
    CHECK_EQ(dmb_attach(&h2, s.base, s.size), DMB_ERR_VERSION);
    memset(s.base, 0, 4096);
    CHECK_EQ(dmb_attach(&h2, s.base, s.size), DMB_ERR_UNINIT);
    memset(s.base, 0x5a, 16);
    CHECK_EQ(dmb_attach(&h2, s.base, s.size), DMB_ERR_MAGIC);
    seg_close(&s);
}

static void test_geometry_fits_size(void)
{
    struct dmb_geometry g;
    uint64_t sizes[] = {1u << 20, 3u << 20, 32u << 20, 1u << 30};

    CHECK_EQ(dmb_geometry_for_size(dmb_min_size() - 1, &g), DMB_ERR_INVAL);
    for (unsigned i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        struct dmb_handle h;
        uint64_t per_channel;

        CHECK_EQ(dmb_geometry_for_size(sizes[i], &g), 0);
        CHECK(g.blocks >= 64);
        /* The layout the handle computes must end inside the segment. */
        memset(&h, 0, sizeof(h));
        h.geo = g;
        CHECK(g.channel_buckets >= g.channels);
        per_channel = sizes[i] / g.channels;
        CHECK(per_channel >= 256);
    }
}

static void test_send_recv_fifo(void)
{
    struct seg s;
    char msg[32];

    seg_open(&s, SEG_SIZE);
    for (int i = 0; i < 50; i++) {
        snprintf(msg, sizeof(msg), "m%d", i);
        CHECK_EQ(send_str(&s, "jobs", msg, 100, 0, NO_EXPIRY), 0);
    }
    for (int i = 0; i < 50; i++) {
        snprintf(msg, sizeof(msg), "m%d", i);
        CHECK_EQ(recv_str(&s, "jobs"), 1);
        CHECK(strcmp(rbuf, msg) == 0);
    }
    CHECK_EQ(recv_str(&s, "jobs"), 0);
    CHECK_EQ(stats(&s).used_channels, 0);
    CHECK_EQ(stats(&s).used_blocks, 0);
    CHECK_EQ(stats(&s).used_nodes, 0);
    check_accounting(&s);
    seg_close(&s);
}

static void test_capacity_refuses_when_full(void)
{
    struct seg s;

    seg_open(&s, SEG_SIZE);
    for (int i = 0; i < 3; i++)
        CHECK_EQ(send_str(&s, "a", "x", 3, 0, NO_EXPIRY), 0);
    CHECK_EQ(send_str(&s, "a", "x", 3, 0, NO_EXPIRY), DMB_ERR_FULL);
    /* A sibling channel is not affected by a full neighbour. */
    CHECK_EQ(send_str(&s, "b", "y", 3, 0, NO_EXPIRY), 0);
    CHECK_EQ(recv_str(&s, "a"), 1);
    CHECK_EQ(send_str(&s, "a", "x", 3, 0, NO_EXPIRY), 0);
    CHECK_EQ(stats(&s).counters.refused_full, 1);
    check_accounting(&s);
    seg_close(&s);
}

static void test_too_small_buffer_keeps_message(void)
{
    struct seg s;
    char small[4];
    uint32_t len;

    seg_open(&s, SEG_SIZE);
    CHECK_EQ(send_str(&s, "c", "hello world", 10, 0, NO_EXPIRY), 0);
    CHECK_EQ(dmb_recv(&s.h, s.slot, "c", 1, 10, 0, 0, small, sizeof(small),
                      &len),
             DMB_ERR_TOOBIG);
    CHECK_EQ(len, 11);
    CHECK_EQ(recv_str(&s, "c"), 1);
    CHECK(strcmp(rbuf, "hello world") == 0);
    seg_close(&s);
}

static void test_large_message_spans_blocks(void)
{
    struct seg s;
    static unsigned char big[1000000];
    struct dmb_wake w;

    seg_open(&s, 4u << 20);
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (unsigned char)(i * 7 + 3);
    CHECK_EQ(dmb_send(&s.h, s.slot, "big", 3, 10, big, sizeof(big), 0,
                      NO_EXPIRY, &w),
             0);
    CHECK(stats(&s).used_blocks > sizeof(big) / DMB_BLOCK_SIZE);
    CHECK_EQ(recv_str(&s, "big"), 1);
    CHECK_EQ(rlen, sizeof(big));
    CHECK(memcmp(rbuf, big, sizeof(big)) == 0);
    CHECK_EQ(stats(&s).used_blocks, 0);
    seg_close(&s);
}

static void test_out_of_order_free_reuses_space(void)
{
    struct seg s;
    static char big[200001];
    struct dmb_wake w;
    int sent = 0;

    /* One channel's unread message must not block the others: fill the
     * store with many channels, drain every other one, refill. */
    seg_open(&s, SEG_SIZE);
    memset(big, 'q', sizeof(big) - 1);
    for (int i = 0; i < 64; i++) {
        char ch[16];

        snprintf(ch, sizeof(ch), "ch%d", i);
        if (dmb_send(&s.h, s.slot, ch, (uint32_t)strlen(ch), 10, big,
                     sizeof(big) - 1, 0, NO_EXPIRY, &w) != 0)
            break;
        sent++;
    }
    CHECK(sent >= 4);
    CHECK_EQ(send_str(&s, "ch0", big, 10, 0, NO_EXPIRY), DMB_ERR_NOSPACE);
    for (int i = 1; i < sent; i += 2) {
        char ch[16];

        snprintf(ch, sizeof(ch), "ch%d", i);
        CHECK_EQ(recv_str(&s, ch), 1);
    }
    for (int i = 1; i < sent; i += 2)
        CHECK_EQ(dmb_send(&s.h, s.slot, "again", 5, 100, big, sizeof(big) - 1,
                          0, NO_EXPIRY, &w),
                 0);
    check_accounting(&s);
    seg_close(&s);
}

static void test_expiry_drops_old_messages(void)
{
    struct seg s;

    seg_open(&s, SEG_SIZE);
    CHECK_EQ(send_str(&s, "e", "old", 10, 0, 100), 0);
    CHECK_EQ(send_str(&s, "e", "new", 10, 50, 1000), 0);
    CHECK_EQ(recv_at(&s, s.slot, "e", 500), 1);
    CHECK(strcmp(rbuf, "new") == 0);
    CHECK_EQ(stats(&s).counters.expired, 1);
    /* Expired messages do not count against capacity. */
    CHECK_EQ(send_str(&s, "f", "1", 1, 0, 10), 0);
    CHECK_EQ(send_str(&s, "f", "2", 1, 20, 1000), 0);
    CHECK_EQ(dmb_expire(&s.h, 5000, DAY_NS), 1);
    CHECK_EQ(stats(&s).used_channels, 0);
    check_accounting(&s);
    seg_close(&s);
}

static void test_groups_deliver_once_per_member(void)
{
    struct seg s;
    struct dmb_wake w;
    uint32_t full, nospace;
    struct dmb_member_info mi[4];

    seg_open(&s, SEG_SIZE);
    CHECK_EQ(dmb_group_add(&s.h, s.slot, "g", 1, "a", 1, 10, 0), 0);
    CHECK_EQ(dmb_group_add(&s.h, s.slot, "g", 1, "b", 1, 10, 0), 0);
    CHECK_EQ(dmb_group_add(&s.h, s.slot, "g", 1, "b", 1, 10, 5), 0);
    CHECK_EQ(stats(&s).used_members, 2);
    CHECK_EQ(dmb_group_members(&s.h, "g", 1, 0, mi, 4), 2);
    CHECK_EQ(dmb_group_send(&s.h, "g", 1, "hi", 2, 10, NO_EXPIRY, DAY_NS,
                            &full, &nospace, &w),
             2);
    /* One record, two references. */
    CHECK_EQ(stats(&s).used_blocks, 1);
    CHECK_EQ(recv_str(&s, "a"), 1);
    CHECK_EQ(recv_str(&s, "b"), 1);
    CHECK_EQ(recv_str(&s, "b"), 0);
    CHECK_EQ(stats(&s).used_blocks, 0);
    CHECK_EQ(dmb_group_discard(&s.h, "g", 1, "a", 1), 0);
    CHECK_EQ(dmb_group_discard(&s.h, "g", 1, "zz", 2), 0);
    CHECK_EQ(dmb_group_discard(&s.h, "nope", 4, "a", 1), 0);
    CHECK_EQ(dmb_group_send(&s.h, "nope", 4, "x", 1, 10, NO_EXPIRY, DAY_NS,
                            &full, &nospace, &w),
             0);
    CHECK_EQ(dmb_group_discard(&s.h, "g", 1, "b", 1), 0);
    CHECK_EQ(stats(&s).used_groups, 0);
    CHECK_EQ(stats(&s).used_channels, 0);
    check_accounting(&s);
    seg_close(&s);
}

static void test_group_send_skips_full_member(void)
{
    struct seg s;
    struct dmb_wake w;
    uint32_t full, nospace;

    seg_open(&s, SEG_SIZE);
    CHECK_EQ(dmb_group_add(&s.h, s.slot, "g", 1, "c1", 2, 3, 0), 0);
    CHECK_EQ(dmb_group_add(&s.h, s.slot, "g", 1, "c2", 2, 3, 0), 0);
    CHECK_EQ(send_str(&s, "c2", "pre", 3, 0, NO_EXPIRY), 0);
    for (int k = 0; k < 4; k++)
        dmb_group_send(&s.h, "g", 1, "m", 1, 1, NO_EXPIRY, DAY_NS, &full,
                       &nospace, &w);
    CHECK_EQ(full, 2); /* the fourth send finds both members full */
    CHECK_EQ(stats(&s).counters.dropped_full, 3);
    for (int k = 0; k < 3; k++)
        CHECK_EQ(recv_str(&s, "c1"), 1);
    CHECK_EQ(recv_str(&s, "c1"), 0);
    check_accounting(&s);
    seg_close(&s);
}

static void test_group_membership_expires(void)
{
    struct seg s;
    struct dmb_wake w;
    uint32_t full, nospace;

    seg_open(&s, SEG_SIZE);
    CHECK_EQ(dmb_group_add(&s.h, s.slot, "g", 1, "a", 1, 10, 0), 0);
    CHECK_EQ(dmb_group_add(&s.h, s.slot, "g", 1, "b", 1, 10, 0), 0);
    CHECK_EQ(dmb_group_add(&s.h, s.slot, "g", 1, "b", 1, 10, 1800), 0);
    CHECK_EQ(dmb_group_send(&s.h, "g", 1, "x", 1, 3500, NO_EXPIRY, 2000,
                            &full, &nospace, &w),
             1);
    CHECK_EQ(recv_str(&s, "a"), 0);
    CHECK_EQ(recv_str(&s, "b"), 1);
    CHECK_EQ(stats(&s).used_members, 1);
    check_accounting(&s);
    seg_close(&s);
}

static void test_specific_channel_owner_only(void)
{
    struct seg s;
    int other = -1;

    seg_open(&s, SEG_SIZE);
    other = dmb_slot_acquire(&s.h, 101, 1, 8, "clientB", 7, 0);
    CHECK(other >= 0 && other != s.slot);
    CHECK_EQ(send_str(&s, "specific.clientA!x", "m", 10, 0, NO_EXPIRY), 0);
    CHECK_EQ(recv_at(&s, other, "specific.clientA!x", 0), DMB_ERR_OWNER);
    CHECK_EQ(recv_at(&s, s.slot, "specific.clientA!x", 0), 1);
    /* A prefix must end at a '.', so "xclientA" is not clientA's. */
    CHECK_EQ(send_str(&s, "xclientA!y", "m", 10, 0, NO_EXPIRY), 0);
    CHECK_EQ(stats(&s).counters.dropped_dead, 1);
    seg_close(&s);
}

static void test_send_to_vanished_process_counts_dead(void)
{
    struct seg s;

    seg_open(&s, SEG_SIZE);
    CHECK_EQ(send_str(&s, "p.gone!x", "m", 10, 0, NO_EXPIRY), 0);
    CHECK_EQ(stats(&s).counters.dropped_dead, 1);
    CHECK_EQ(stats(&s).used_channels, 0);
    check_accounting(&s);
    seg_close(&s);
}

static void test_slot_release_reclaims_everything(void)
{
    struct seg s;
    struct dmb_slot_info info;
    int b;

    seg_open(&s, SEG_SIZE);
    b = dmb_slot_acquire(&s.h, 4242, 99, 9, "clientB", 7, 0);
    CHECK(b >= 0);
    CHECK_EQ(send_str(&s, "x.clientB!1", "a", 10, 0, NO_EXPIRY), 0);
    CHECK_EQ(send_str(&s, "x.clientB!1", "b", 10, 0, NO_EXPIRY), 0);
    CHECK_EQ(dmb_group_add(&s.h, b, "g", 1, "x.clientB!1", 11, 10, 0), 0);
    CHECK_EQ(dmb_group_add(&s.h, b, "g", 1, "x.clientA!2", 11, 10, 0), 0);
    CHECK_EQ(dmb_slot_info(&s.h, b, &info), 0);
    CHECK_EQ(info.channels, 1);
    /* A reused pid with another start time is not the dead process. */
    CHECK_EQ(dmb_slot_reclaim(&s.h, b, 4242, 100), 0);
    CHECK_EQ(dmb_slot_reclaim(&s.h, b, 4242, 99), 1);
    CHECK_EQ(stats(&s).counters.dropped_dead, 2);
    CHECK_EQ(stats(&s).used_members, 1);
    CHECK_EQ(stats(&s).used_slots, 1);
    dmb_slot_info(&s.h, b, &info);
    CHECK_EQ(info.in_use, 0);
    check_accounting(&s);
    seg_close(&s);
}

static void test_waiters_reported_and_cleared(void)
{
    struct seg s;
    struct dmb_wake w;
    uint32_t len;
    int b;

    seg_open(&s, SEG_SIZE);
    b = dmb_slot_acquire(&s.h, 5, 5, 5, "clientB", 7, 0);
    CHECK_EQ(dmb_recv(&s.h, b, "q", 1, 10, 0, DMB_RECV_WAIT, rbuf,
                      sizeof(rbuf), &len),
             0);
    CHECK_EQ(dmb_send(&s.h, s.slot, "q", 1, 10, "m", 1, 0, NO_EXPIRY, &w), 0);
    CHECK(w.mask[b >> 6] & (1ull << (b & 63)));
    CHECK_EQ(dmb_recv(&s.h, b, "q", 1, 10, 0, DMB_RECV_UNWAIT, rbuf,
                      sizeof(rbuf), &len),
             1);
    CHECK_EQ(dmb_send(&s.h, s.slot, "q", 1, 10, "m", 1, 0, NO_EXPIRY, &w), 0);
    CHECK_EQ(w.mask[0] | w.mask[1], 0);
    CHECK_EQ(dmb_recv(&s.h, b, "q", 1, 10, 0, 0, rbuf, sizeof(rbuf), &len), 1);
    /* Waiting with nothing queued keeps the entry; unwait frees it. */
    CHECK_EQ(dmb_recv(&s.h, b, "r", 1, 10, 0, DMB_RECV_WAIT, rbuf,
                      sizeof(rbuf), &len),
             0);
    CHECK_EQ(stats(&s).used_channels, 1);
    CHECK_EQ(dmb_unwait(&s.h, b, "r", 1), 0);
    CHECK_EQ(stats(&s).used_channels, 0);
    seg_close(&s);
}

static void test_flush_keeps_waiters(void)
{
    struct seg s;
    struct dmb_wake w;
    uint32_t len, full, nospace;

    seg_open(&s, SEG_SIZE);
    CHECK_EQ(dmb_recv(&s.h, s.slot, "q2", 2, 10, 0, DMB_RECV_WAIT, rbuf,
                      sizeof(rbuf), &len),
             0);
    CHECK_EQ(send_str(&s, "q", "m", 10, 0, NO_EXPIRY), 0);
    CHECK_EQ(dmb_group_add(&s.h, s.slot, "g", 1, "a", 1, 10, 0), 0);
    CHECK_EQ(dmb_flush(&s.h), 0);
    CHECK_EQ(recv_str(&s, "q"), 0);
    CHECK_EQ(dmb_group_send(&s.h, "g", 1, "x", 1, 0, NO_EXPIRY, DAY_NS,
                            &full, &nospace, &w),
             0);
    CHECK_EQ(dmb_send(&s.h, s.slot, "q2", 2, 10, "m", 1, 0, NO_EXPIRY, &w),
             0);
    CHECK(w.mask[s.slot >> 6] & (1ull << (s.slot & 63)));
    CHECK_EQ(stats(&s).counters.flushed, 1);
    check_accounting(&s);
    seg_close(&s);
}

/* A child dies at a crash point, holding the lock; the parent's next
 * operation must repair and go on with nothing torn. */
static void crash_child_at(struct seg *s, int point)
{
    pid_t pid = fork();
    int status;

    if (pid == 0) {
        struct dmb_wake w;
        uint32_t full, nospace;

        dmb_test_crash_at(point, 1);
        if (point == 3)
            recv_str(s, "k");
        else if (point == 4)
            dmb_group_send(&s->h, "g", 1, "gm", 2, 0, NO_EXPIRY, DAY_NS,
                           &full, &nospace, &w);
        else
            send_str(s, "k", "torn?", 100, 0, NO_EXPIRY);
        _exit(0);
    }
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
}

static void test_killed_lock_holder_is_repaired(void)
{
    struct seg s;
    struct dmb_stats st;
    int got = 0;

    seg_open(&s, SEG_SIZE);
    CHECK_EQ(dmb_group_add(&s.h, s.slot, "g", 1, "m1", 2, 10, 0), 0);
    CHECK_EQ(dmb_group_add(&s.h, s.slot, "g", 1, "m2", 2, 10, 0), 0);
    CHECK_EQ(send_str(&s, "k", "first", 100, 0, NO_EXPIRY), 0);
    for (int point = 1; point <= 4; point++)
        crash_child_at(&s, point);
    st = stats(&s);
    CHECK(st.counters.repairs >= 4);
    /* Whatever the children left, every message is whole. */
    while (recv_str(&s, "k") == 1) {
        CHECK(strcmp(rbuf, "first") == 0 || strcmp(rbuf, "torn?") == 0);
        got++;
    }
    CHECK(got <= 3);
    while (recv_str(&s, "m1") == 1)
        CHECK(strcmp(rbuf, "gm") == 0);
    while (recv_str(&s, "m2") == 1)
        CHECK(strcmp(rbuf, "gm") == 0);
    st = stats(&s);
    CHECK_EQ(st.used_blocks, 0);
    CHECK_EQ(st.used_nodes, 0);
    CHECK_EQ(st.queued, 0);
    CHECK_EQ(send_str(&s, "k", "after", 100, 0, NO_EXPIRY), 0);
    CHECK_EQ(recv_str(&s, "k"), 1);
    seg_close(&s);
}

static void test_repair_recovers_damaged_links(void)
{
    struct seg s;
    struct dmb_stats st;

    seg_open(&s, SEG_SIZE);
    for (int i = 0; i < 10; i++)
        CHECK_EQ(send_str(&s, "d", "0123456789", 100, 0, NO_EXPIRY), 0);
    CHECK_EQ(dmb_group_add(&s.h, s.slot, "g", 1, "d", 1, 100, 0), 0);
    /* Point every node's next at itself: a cycle a walk must survive. */
    for (uint32_t i = 0; i < 10; i++) {
        uint32_t *next = (uint32_t *)((char *)s.base + s.h.off_nodes +
                                      (uint64_t)i * 24);
        *next = i;
    }
    CHECK_EQ(dmb_repair(&s.h), 0);
    st = stats(&s);
    CHECK_EQ(st.queued, 1);
    CHECK_EQ(st.used_nodes, 1);
    CHECK_EQ(st.used_blocks, 1);
    CHECK_EQ(st.used_members, 1);
    CHECK_EQ(recv_str(&s, "d"), 1);
    CHECK_EQ(recv_str(&s, "d"), 0);
    CHECK_EQ(dmb_repair(&s.h), 0);
    CHECK_EQ(stats(&s).used_blocks, 0);
    seg_close(&s);
}

/* A record whose length was damaged to nearly 4 GiB, and a free list
 * damaged so that freeing the record loops between two blocks: dropping
 * it stops at the blocks in use, and the store keeps working. */
static void test_damaged_record_length_is_bounded(void)
{
    struct seg s;
    struct dmb_block_view {
        uint32_t next, refs, len, reserved;
    } *b;

    seg_open(&s, SEG_SIZE);
    CHECK_EQ(send_str(&s, "d", "0123456789", 100, 0, NO_EXPIRY), 0);
    CHECK_EQ(stats(&s).used_blocks, 1);
    /* The store hands out block 0 first, then block 1. */
    b = (struct dmb_block_view *)((char *)s.base + s.h.off_blocks);
    CHECK_EQ(b[0].len, 10);
    b[0].len = 0xfffffff0u;
    b[0].next = 1;
    b[1].next = 0;
    CHECK_EQ(dmb_flush(&s.h), 0);
    CHECK_EQ(stats(&s).used_blocks, 0);
    CHECK_EQ(send_str(&s, "z", "ok", 10, 0, NO_EXPIRY), 0);
    CHECK_EQ(recv_str(&s, "z"), 1);
    seg_close(&s);
}

static uint64_t rng_state = 88172645463325252ull;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* One random operation on a small world of names. */
static void random_op(struct seg *s, uint64_t now)
{
    static char payload[3000];
    char ch[8], gr[8];
    struct dmb_wake w;
    uint32_t full, nospace, len;
    uint32_t plen = (uint32_t)(rnd() % sizeof(payload));

    snprintf(ch, sizeof(ch), "c%d", (int)(rnd() % 12));
    snprintf(gr, sizeof(gr), "g%d", (int)(rnd() % 3));
    switch (rnd() % 9) {
    case 0:
    case 1:
        dmb_send(&s->h, s->slot, ch, (uint32_t)strlen(ch), 20, payload, plen,
                 now, now + rnd() % 400, &w);
        break;
    case 2:
    case 3:
        dmb_recv(&s->h, s->slot, ch, (uint32_t)strlen(ch), 20, now,
                 (uint32_t)(rnd() % 4), rbuf, sizeof(rbuf), &len);
        break;
    case 4:
        dmb_group_add(&s->h, s->slot, gr, 2, ch, (uint32_t)strlen(ch), 20,
                      now);
        break;
    case 5:
        dmb_group_discard(&s->h, gr, 2, ch, (uint32_t)strlen(ch));
        break;
    case 6:
        dmb_group_send(&s->h, gr, 2, payload, plen, now, now + 300, 500,
                       &full, &nospace, &w);
        break;
    case 7:
        dmb_unwait(&s->h, s->slot, ch, (uint32_t)strlen(ch));
        break;
    default:
        if (rnd() % 50 == 0)
            dmb_flush(&s->h);
        else if (rnd() % 10 == 0)
            dmb_expire(&s->h, now, 500);
        break;
    }
}

static void test_random_ops_keep_accounting(void)
{
    struct seg s;
    struct dmb_stats before, after;

    seg_open(&s, SEG_SIZE);
    for (uint64_t now = 0; now < 200000; now++) {
        random_op(&s, now);
        if (now % 20000 == 0) {
            check_accounting(&s);
            /* A repair of a sound segment changes nothing. */
            before = stats(&s);
            dmb_repair(&s.h);
            after = stats(&s);
            CHECK_EQ(before.used_blocks, after.used_blocks);
            CHECK_EQ(before.used_nodes, after.used_nodes);
            CHECK_EQ(before.used_members, after.used_members);
            CHECK_EQ(before.used_channels, after.used_channels);
            CHECK_EQ(before.queued, after.queued);
        }
    }
    check_accounting(&s);
    seg_close(&s);
}

static void test_random_damage_never_crashes(void)
{
    struct seg s;
    uint64_t lock_end;

    seg_open(&s, SEG_SIZE);
    lock_end = 128 + 64; /* the mutex: damage there is out of scope */
    for (int round = 0; round < 200; round++) {
        for (uint64_t now = 0; now < 300; now++)
            random_op(&s, (uint64_t)round * 1000 + now);
        for (int k = 0; k < 20; k++) {
            uint64_t off = lock_end + rnd() % (s.h.end - lock_end);

            ((unsigned char *)s.base)[off] ^= (unsigned char)(1 + rnd() % 255);
        }
        for (uint64_t now = 0; now < 300; now++)
            random_op(&s, (uint64_t)round * 1000 + now);
        if (round % 10 == 0)
            dmb_repair(&s.h);
    }
    CHECK_EQ(dmb_repair(&s.h), 0);
    CHECK_EQ(dmb_flush(&s.h), 0);
    CHECK_EQ(send_str(&s, "z", "ok", 10, 0, NO_EXPIRY), 0);
    CHECK_EQ(recv_str(&s, "z"), 1);
    seg_close(&s);
}

/* ------------------------------------------------------------------ */
/* Moving messages between channels (acknowledgements for kombu).      */

#define BIG_CAP 4294967295u

static int move_str(struct seg *s, int slot, const char *src,
                    const char *dst, uint32_t flags, struct dmb_ref *ref,
                    struct dmb_wake *w)
{
    int rc = dmb_move(&s->h, (uint32_t)slot, src, (uint32_t)strlen(src),
                      dst, (uint32_t)strlen(dst), BIG_CAP, 1, flags, rbuf,
                      sizeof(rbuf) - 1, &rlen, ref, w);

    if (rc == 1)
        rbuf[rlen] = 0;
    return rc;
}

static int settle(struct seg *s, const char *name, const struct dmb_ref *ref,
                  const char *dst, struct dmb_wake *w)
{
    return dmb_settle(&s->h, (uint32_t)s->slot, name, (uint32_t)strlen(name),
                      ref, dst, dst ? (uint32_t)strlen(dst) : 0, BIG_CAP, 1,
                      w);
}

static uint32_t depth_of(struct seg *s, const char *name)
{
    struct dmb_channel_info info;

    if (dmb_channel_find(&s->h, name, (uint32_t)strlen(name), &info) != 1)
        return 0;
    return info.depth;
}

static void test_move_settles_by_reference(void)
{
    struct seg s;
    struct dmb_ref r1, r2;
    struct dmb_wake w;

    seg_open(&s, SEG_SIZE);
    send_str(&s, "q", "a", 10, 0, NO_EXPIRY);
    send_str(&s, "q", "b", 10, 0, NO_EXPIRY);
    send_str(&s, "q", "c", 10, 0, NO_EXPIRY);
    CHECK_EQ(move_str(&s, s.slot, "q", "p", 0, &r1, &w), 1);
    CHECK(strcmp(rbuf, "a") == 0);
    CHECK_EQ(move_str(&s, s.slot, "q", "p", 0, &r2, &w), 1);
    CHECK(strcmp(rbuf, "b") == 0);
    CHECK(r1.stamp != r2.stamp || r1.node != r2.node);
    CHECK_EQ(depth_of(&s, "q"), 1);
    CHECK_EQ(depth_of(&s, "p"), 2);
    /* Moving keeps every message queued; settling ends or returns it. */
    CHECK_EQ(stats(&s).queued, 3);
    CHECK_EQ(settle(&s, "p", &r1, NULL, &w), 1);
    CHECK_EQ(settle(&s, "p", &r1, NULL, &w), 0);
    CHECK_EQ(stats(&s).counters.received, 1);
    CHECK_EQ(settle(&s, "p", &r2, "q", &w), 1);
    CHECK_EQ(settle(&s, "p", &r2, "q", &w), 0);
    CHECK_EQ(depth_of(&s, "p"), 0);
    CHECK_EQ(recv_str(&s, "q"), 1);
    CHECK(strcmp(rbuf, "c") == 0);
    CHECK_EQ(recv_str(&s, "q"), 1);
    CHECK(strcmp(rbuf, "b") == 0);
    CHECK_EQ(stats(&s).used_nodes, 0);
    CHECK_EQ(stats(&s).used_blocks, 0);
    CHECK_EQ(stats(&s).used_channels, 0);
    check_accounting(&s);
    seg_close(&s);
}

static void test_move_waits_and_refuses(void)
{
    struct seg s;
    struct dmb_ref r;
    struct dmb_wake w;
    struct dmb_channel_info info;
    uint32_t len;
    int b;

    seg_open(&s, SEG_SIZE);
    b = dmb_slot_acquire(&s.h, 5, 5, 5, "clientB", 7, 0);
    CHECK_EQ(move_str(&s, b, "q", "p", DMB_RECV_WAIT, &r, &w), 0);
    CHECK_EQ(dmb_channel_find(&s.h, "q", 1, &info), 1);
    CHECK(info.waiters[b >> 6] & (1ull << (b & 63)));
    CHECK_EQ(send_str(&s, "q", "m", 10, 0, NO_EXPIRY), 0);
    CHECK_EQ(dmb_send(&s.h, s.slot, "q", 1, 10, "n", 1, 0, NO_EXPIRY, &w),
             0);
    CHECK(w.mask[b >> 6] & (1ull << (b & 63)));
    CHECK_EQ(move_str(&s, b, "q", "p", DMB_RECV_UNWAIT, &r, &w), 1);
    CHECK_EQ(dmb_channel_find(&s.h, "q", 1, &info), 1);
    CHECK_EQ(info.waiters[0] | info.waiters[1], 0);
    /* Whoever waits on the destination is woken by a move into it. */
    CHECK_EQ(recv_at(&s, b, "back", 0), 0);
    CHECK_EQ(dmb_recv(&s.h, b, "back", 4, 10, 0, DMB_RECV_WAIT, rbuf,
                      sizeof(rbuf), &len), 0);
    CHECK_EQ(settle(&s, "p", &r, "back", &w), 1);
    CHECK(w.mask[b >> 6] & (1ull << (b & 63)));
    CHECK_EQ(w.channel, len);
    /* Refusals move nothing. */
    CHECK_EQ(dmb_move(&s.h, s.slot, "q", 1, "full", 4, 1, 1, 0, rbuf,
                      sizeof(rbuf), &len, &r, &w), 1);
    CHECK_EQ(send_str(&s, "q", "o", 10, 0, NO_EXPIRY), 0);
    CHECK_EQ(dmb_move(&s.h, s.slot, "q", 1, "full", 4, 1, 1, 0, rbuf,
                      sizeof(rbuf), &len, &r, &w), DMB_ERR_FULL);
    CHECK_EQ(dmb_move(&s.h, s.slot, "q", 1, "p", 1, 10, 1, 0, rbuf, 0, &len,
                      &r, &w), DMB_ERR_TOOBIG);
    CHECK_EQ(len, 1);
    CHECK_EQ(dmb_move(&s.h, s.slot, "q", 1, "q", 1, 10, 1, 0, rbuf,
                      sizeof(rbuf), &len, &r, &w), DMB_ERR_INVAL);
    CHECK_EQ(depth_of(&s, "q"), 1);
    /* Without a buffer the message moves uncopied. */
    CHECK_EQ(dmb_move(&s.h, s.slot, "q", 1, "p", 1, 10, 1, 0, NULL, 0, &len,
                      &r, &w), 1);
    CHECK_EQ(len, 1);
    CHECK_EQ(depth_of(&s, "p"), 1);
    check_accounting(&s);
    seg_close(&s);
}

/* Kill a child at crash point 11, inside transfer() between its unlink
 * and its link, while it moves (settle 0) or settles (settle 1). */
static void kill_mover(struct seg *s, int settle_ref, struct dmb_ref *ref)
{
    pid_t pid = fork();
    int status;

    if (pid == 0) {
        struct dmb_wake w;
        struct dmb_ref r;

        dmb_test_crash_at(11, 1);
        if (settle_ref)
            settle(s, "p", ref, "q", &w);
        else
            move_str(s, s->slot, "q", "p", 0, &r, &w);
        _exit(0);
    }
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
}

static void test_killed_mover_loses_nothing(void)
{
    struct seg s;
    struct dmb_ref r;
    struct dmb_wake w;

    seg_open(&s, SEG_SIZE);
    send_str(&s, "q", "one", 10, 0, NO_EXPIRY);
    kill_mover(&s, 0, NULL);
    /* The next locked operation repairs: the message is in p, once. */
    CHECK_EQ(depth_of(&s, "q"), 0);
    CHECK_EQ(depth_of(&s, "p"), 1);
    CHECK(stats(&s).counters.repairs >= 1);
    CHECK_EQ(move_str(&s, s.slot, "p", "q", 0, &r, &w), 1);
    CHECK(strcmp(rbuf, "one") == 0);
    CHECK_EQ(move_str(&s, s.slot, "q", "p", 0, &r, &w), 1);
    kill_mover(&s, 1, &r);
    CHECK_EQ(depth_of(&s, "p"), 0);
    CHECK_EQ(depth_of(&s, "q"), 1);
    CHECK_EQ(recv_str(&s, "q"), 1);
    CHECK(strcmp(rbuf, "one") == 0);
    CHECK_EQ(recv_str(&s, "q"), 0);
    CHECK_EQ(stats(&s).used_nodes, 0);
    CHECK_EQ(stats(&s).used_blocks, 0);
    check_accounting(&s);
    seg_close(&s);
}

static void test_remove_and_scan_channels(void)
{
    struct seg s;
    struct dmb_channel_info info;
    uint32_t pos = 0, len;
    uint64_t sent;
    int found = 0, rc;

    seg_open(&s, SEG_SIZE);
    send_str(&s, "x", "r1", 10, 0, NO_EXPIRY);
    send_str(&s, "x", "r2", 10, 0, NO_EXPIRY);
    send_str(&s, "x", "r1", 10, 0, NO_EXPIRY);
    CHECK_EQ(dmb_remove(&s.h, "x", 1, "r1", 2), 1);
    CHECK_EQ(dmb_remove(&s.h, "x", 1, "r", 1), 0);
    CHECK_EQ(dmb_remove(&s.h, "none", 4, "r1", 2), 0);
    CHECK_EQ(depth_of(&s, "x"), 2);
    CHECK_EQ(dmb_peek(&s.h, "x", 1, 0, rbuf, sizeof(rbuf), &len, &sent), 1);
    CHECK(len == 2 && memcmp(rbuf, "r2", 2) == 0);
    CHECK_EQ(dmb_remove(&s.h, "x", 1, "r1", 2), 1);
    CHECK_EQ(dmb_remove(&s.h, "x", 1, "r2", 2), 1);
    CHECK_EQ(dmb_channel_find(&s.h, "x", 1, &info), 0);
    CHECK_EQ(stats(&s).counters.flushed, 3);
    send_str(&s, "kombu:q:a", "m", 10, 0, NO_EXPIRY);
    send_str(&s, "other", "m", 10, 0, NO_EXPIRY);
    send_str(&s, "kombu:q:b", "m", 10, 0, NO_EXPIRY);
    send_str(&s, "kombu:u:1", "m", 10, 0, NO_EXPIRY);
    CHECK_EQ(dmb_channel_find(&s.h, "kombu:q:b", 9, &info), 1);
    CHECK_EQ(info.depth, 1);
    CHECK(strcmp(info.name, "kombu:q:b") == 0);
    for (int calls = 0; pos < s.h.geo.channels && calls < 100000; calls++) {
        rc = dmb_channel_scan(&s.h, &pos, "kombu:q:", 8, 7);
        CHECK(rc == 0 || rc == 1);
        if (rc == 1) {
            CHECK_EQ(dmb_channel_at(&s.h, pos, &info), 1);
            CHECK(strncmp(info.name, "kombu:q:", 8) == 0);
            found++;
            pos++;
        }
    }
    CHECK_EQ(found, 2);
    CHECK_EQ(pos, s.h.geo.channels);
    CHECK_EQ(dmb_channel_scan(&s.h, &pos, "kombu:q:", 8, 7), 0);
    check_accounting(&s);
    seg_close(&s);
}

/* ------------------------------------------------------------------ */

struct test {
    const char *name;
    void (*fn)(void);
};

#define T(n) {#n, test_##n}
static const struct test tests[] = {
    T(init_and_attach),
    T(attach_rejects_bad_headers),
    T(geometry_fits_size),
    T(send_recv_fifo),
    T(capacity_refuses_when_full),
    T(too_small_buffer_keeps_message),
    T(large_message_spans_blocks),
    T(out_of_order_free_reuses_space),
    T(expiry_drops_old_messages),
    T(groups_deliver_once_per_member),
    T(group_send_skips_full_member),
    T(group_membership_expires),
    T(specific_channel_owner_only),
    T(send_to_vanished_process_counts_dead),
    T(slot_release_reclaims_everything),
    T(waiters_reported_and_cleared),
    T(flush_keeps_waiters),
    T(killed_lock_holder_is_repaired),
    T(repair_recovers_damaged_links),
    T(damaged_record_length_is_bounded),
    T(random_ops_keep_accounting),
    T(random_damage_never_crashes),
    T(move_settles_by_reference),
    T(move_waits_and_refuses),
    T(killed_mover_loses_nothing),
    T(remove_and_scan_channels),
};
#undef T

int main(int argc, char **argv)
{
    size_t n = sizeof(tests) / sizeof(tests[0]);
    int ran = 0, failed = 0;

    if (argc == 2 && strcmp(argv[1], "--list") == 0) {
        for (size_t i = 0; i < n; i++)
            puts(tests[i].name);
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        if (argc == 2 && strcmp(argv[1], tests[i].name) != 0)
            continue;
        failures = 0;
        tests[i].fn();
        ran++;
        failed += failures > 0;
        printf("%s %s\n", failures ? "FAIL" : "ok  ", tests[i].name);
    }
    if (ran == 0) {
        fprintf(stderr, "no test named %s\n", argc == 2 ? argv[1] : "");
        return 2;
    }
    printf("%d passed, %d failed\n", ran - failed, failed);
    return failed ? 1 : 0;
}
