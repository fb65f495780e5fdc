/*
 * fuzz_ring.c - libFuzzer target over dmb's C API on a damaged segment.
 *
 * Each input is a program: a stream of one-byte opcodes with their
 * arguments (any byte string is one).  Every run starts from a freshly
 * formatted 1 MiB segment with two process slots; the program sends,
 * receives, peeks, joins and leaves groups, expires, flushes, purges,
 * takes and gives back slots, repairs, and damages the segment: it
 * overwrites links, lengths and counts of table entries with index-like
 * values, flips bytes anywhere, or rewrites header fields.  The mutex is
 * never damaged: a pthread mutex cannot be checked from outside, and
 * damage there is outside what dmb can survive (docs/reliability.md; a
 * forged lock word is tested from Python, test_hardening_damage.py).
 *
 * What must hold, checked after every program:
 *   - no crash, no sanitizer report, no hang (libFuzzer's -timeout);
 *   - while the program has done no damage, no operation reports
 *     DMB_ERR_CORRUPT, every received message is whole (it carries its
 *     own length and sequence number and a pattern derived from them),
 *     and the accounting identity holds before any repair;
 *   - after dmb_repair, whatever the damage: a second repair changes no
 *     usage count, the channels' depths add up to the queued count, the
 *     accounting identity holds, purging every channel and flushing
 *     leaves no record, node, member or group behind, and a fresh
 *     message goes in and comes out intact.
 *
 *   cmake -S . -B build-fuzz -DDMB_FUZZ=ON -DCMAKE_C_COMPILER=clang
 *   cmake --build build-fuzz && build-fuzz/fuzz_ring -max_total_time=60
 *   (or scripts/fuzz SECONDS)
 */
#define _GNU_SOURCE
#include "_ring.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define SEG_SIZE (1u << 20)
#define LOCK_FIRST 128      /* the mutex: offsetof(struct dmb_header, lock) */
#define LOCK_END 192        /* ... and its 64-byte aligned end */
#define MAX_PAYLOAD 300000  /* larger than a fifth of the store */
#define STAMP 12            /* bytes of a message's self-description */

/* Stop the fuzzer with a message libFuzzer reports as a crash. */
#define REQUIRE(cond)                                                      \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "fuzz_ring.c:%d: %s\n", __LINE__, #cond);      \
            abort();                                                       \
        }                                                                  \
    } while (0)

/* The program being run: its bytes and what it has done so far. */
struct run {
    const uint8_t *p;
    size_t left;
    struct dmb_handle h;
    unsigned char *base;
    int slot[2];
    uint64_t now;
    uint32_t seq;
    int damaged;
    int repair_on_corrupt;
    struct dmb_ref ref[4];  /* deliveries dmb_move made, to settle */
    char ref_channel[4][32];
};

static unsigned char *segment;
static unsigned char payload[MAX_PAYLOAD];
static unsigned char rbuf[MAX_PAYLOAD + 64];

/* ------------------------------------------------------------------ */
/* Reading the program.                                                */

static uint32_t take(struct run *r, unsigned bytes)
{
    uint32_t v = 0;

    for (unsigned i = 0; i < bytes; i++) {
        v <<= 8;
        if (r->left) {
            v |= *r->p++;
            r->left--;
        }
    }
    return v;
}

/* A name from a small alphabet, so operations meet on the same entries;
 * now and then an odd one (empty, too long, or with arbitrary bytes). */
static uint32_t pick_name(struct run *r, char *out, const char *kind)
{
    uint32_t sel = take(r, 1);

    if (sel < 200)
        return (uint32_t)snprintf(out, 32, "%s%u", kind, sel % 6);
    if (sel < 230) {
        char client[DMB_CLIENT_MAX + 1];
        struct dmb_slot_info info;

        dmb_slot_info(&r->h, sel % 4, &info);
        memcpy(client, info.client, sizeof(info.client));
        client[DMB_CLIENT_MAX] = 0;
        return (uint32_t)snprintf(out, 64, "s.%s!%u", client, sel % 3);
    }
    if (sel < 250) {
        uint32_t len = take(r, 1) % 110;

        for (uint32_t i = 0; i < len; i++)
            out[i] = (char)(take(r, 1) | 1); /* no NUL: names print */
        return len;
    }
    memset(out, 'n', DMB_NAME_MAX);
    return sel == 250 ? 0 : DMB_NAME_MAX;
}

/* ------------------------------------------------------------------ */
/* Self-checking payloads: length, sequence number, then a pattern.    */

static uint32_t make_payload(struct run *r)
{
    uint32_t sel = take(r, 1), len;
    uint32_t seq = ++r->seq;

    if (sel < 200)
        len = STAMP + take(r, 1) * 3;
    else if (sel < 254)
        len = STAMP + take(r, 2) % 8192;
    else /* now and then one large enough to fill the store */
        len = STAMP + (take(r, 3) % (MAX_PAYLOAD - STAMP));
    memcpy(payload, &len, 4);
    memcpy(payload + 4, &seq, 4);
    memset(payload + 8, 0, 4);
    for (uint32_t i = STAMP; i < len; i++)
        payload[i] = (unsigned char)(seq * 31u + i * 7u);
    return len;
}

static void check_payload(const struct run *r, uint32_t len)
{
    uint32_t want, seq;

    if (r->damaged)
        return;
    REQUIRE(len >= STAMP);
    memcpy(&want, rbuf, 4);
    memcpy(&seq, rbuf + 4, 4);
    REQUIRE(want == len);
    REQUIRE(seq >= 1 && seq <= r->seq);
    for (uint32_t i = STAMP; i < len; i++)
        REQUIRE(rbuf[i] == (unsigned char)(seq * 31u + i * 7u));
}

/* An operation's result: no damage, no DMB_ERR_CORRUPT. */
static void result(struct run *r, int rc)
{
    if (rc != DMB_ERR_CORRUPT)
        return;
    REQUIRE(r->damaged);
    if (r->repair_on_corrupt)
        REQUIRE(dmb_repair(&r->h) == 0);
}

/* ------------------------------------------------------------------ */
/* Operations.                                                         */

static int slot_of(struct run *r)
{
    int s = r->slot[take(r, 1) & 1];

    return s >= 0 ? s : 0;
}

static void op_send(struct run *r)
{
    char name[128];
    struct dmb_wake wake;
    uint32_t nlen = pick_name(r, name, "c");
    uint32_t cap = take(r, 1) % 8;
    uint32_t len = make_payload(r);
    uint64_t life = (uint64_t)take(r, 1) * 16 + 1;

    result(r, dmb_send(&r->h, (uint32_t)slot_of(r), name, nlen, cap, payload,
                       len, r->now, r->now + life, &wake));
}

static void op_recv(struct run *r)
{
    char name[128];
    uint32_t nlen = pick_name(r, name, "c");
    uint32_t flags = take(r, 1) & 3;
    uint32_t room = take(r, 1) < 20 ? 8 : sizeof(rbuf);
    uint32_t len = 0;
    int rc = dmb_recv(&r->h, (uint32_t)slot_of(r), name, nlen, 4, r->now,
                      flags, rbuf, room, &len);

    if (rc == 1) {
        REQUIRE(len <= room);
        check_payload(r, len);
    }
    result(r, rc);
}

static void op_peek(struct run *r)
{
    char name[128];
    uint32_t nlen = pick_name(r, name, "c");
    uint32_t len = 0;
    uint64_t sent;
    int rc = dmb_peek(&r->h, name, nlen, take(r, 1) % 4, rbuf, sizeof(rbuf),
                      &len, &sent);

    if (rc == 1)
        check_payload(r, len);
    result(r, rc);
}

static void op_group_add(struct run *r)
{
    char g[128], c[128];
    uint32_t glen = pick_name(r, g, "g");
    uint32_t clen = pick_name(r, c, "c");

    result(r, dmb_group_add(&r->h, (uint32_t)slot_of(r), g, glen, c, clen,
                            1 + take(r, 1) % 6, r->now));
}

static void op_group_discard(struct run *r)
{
    char g[128], c[128];
    uint32_t glen = pick_name(r, g, "g");
    uint32_t clen = pick_name(r, c, "c");

    result(r, dmb_group_discard(&r->h, g, glen, c, clen));
}

static void op_group_send(struct run *r)
{
    char g[128];
    struct dmb_wake wake;
    uint32_t full, nospace;
    uint32_t glen = pick_name(r, g, "g");
    uint32_t len = make_payload(r);
    uint64_t group_life = (uint64_t)take(r, 1) * 64 + 1;

    result(r, dmb_group_send(&r->h, g, glen, payload, len, r->now,
                             r->now + 4096, group_life, &full, &nospace,
                             &wake));
}

static void op_members(struct run *r)
{
    char g[128];
    struct dmb_member_info out[4];
    uint32_t glen = pick_name(r, g, "g");

    result(r, dmb_group_members(&r->h, g, glen, take(r, 1) % 4, out, 4));
}

/* Move a channel's head to another (dmb/kombu.py's "take unacked"). */
static void op_move(struct run *r)
{
    char src[128], dst[128];
    struct dmb_wake wake;
    struct dmb_ref ref;
    uint32_t slen = pick_name(r, src, "c");
    uint32_t dlen = pick_name(r, dst, "u");
    uint32_t flags = take(r, 1), len = 0, k = flags % 4;
    int copy = flags & 4;
    int rc = dmb_move(&r->h, (uint32_t)slot_of(r), src, slen, dst, dlen,
                      1 + take(r, 1) % 6, r->now, flags & 3,
                      copy ? rbuf : NULL, copy ? sizeof(rbuf) : 0, &len,
                      &ref, &wake);

    if (rc == 1 && copy)
        check_payload(r, len);
    if (rc == 1 && dlen < sizeof(r->ref_channel[k])) {
        r->ref[k] = ref;
        memcpy(r->ref_channel[k], dst, dlen);
        r->ref_channel[k][dlen] = 0;
    }
    result(r, rc);
}

/* Settle a delivery: acknowledge it, move it on, or name a bogus one. */
static void op_settle(struct run *r)
{
    char dst[128];
    struct dmb_wake wake;
    uint32_t sel = take(r, 1), k = sel % 4;
    struct dmb_ref ref = r->ref[k];
    const char *name = r->ref_channel[k];
    uint32_t dlen = 0;

    if (sel >= 200) {
        ref.node = take(r, 4);
        ref.stamp = take(r, 4);
    }
    if (sel & 8)
        dlen = pick_name(r, dst, "c");
    if (name[0] == 0)
        name = "u0";
    result(r, dmb_settle(&r->h, (uint32_t)slot_of(r), name,
                         (uint32_t)strlen(name), &ref, dlen ? dst : NULL,
                         dlen, 1 + take(r, 1) % 6, r->now, &wake));
}

/* Remove the message just built (if it was sent and is still queued),
 * find a channel by name, or scan for a prefix. */
static void op_lookup(struct run *r)
{
    char name[128];
    struct dmb_channel_info ci;
    uint32_t sel = take(r, 1), nlen = pick_name(r, name, "c");
    uint32_t pos = take(r, 2), len;
    int rc;

    if (sel < 96) {
        memcpy(&len, payload, 4);
        if (len < STAMP || len > MAX_PAYLOAD)
            len = STAMP;
        rc = dmb_remove(&r->h, name, nlen, payload, len);
    } else if (sel < 160) {
        rc = dmb_channel_find(&r->h, name, nlen, &ci);
    } else {
        rc = dmb_channel_scan(&r->h, &pos, name, nlen % 8, take(r, 1));
        REQUIRE(rc < 0 || pos <= r->h.geo.channels + 0x10000u);
    }
    result(r, rc);
}

/* The read-outs python -m dmb.inspect uses, over a few entries. */
static void op_tables(struct run *r)
{
    struct dmb_channel_info ci;
    struct dmb_group_info gi;
    struct dmb_slot_info si;
    struct dmb_stats st;
    uint32_t from = take(r, 1) < 200 ? 0 : take(r, 2);

    for (uint32_t i = from; i < from + 8; i++) {
        int c = dmb_channel_at(&r->h, i, &ci), g = dmb_group_at(&r->h, i, &gi);

        REQUIRE(i < r->h.geo.channels ? c == 0 || c == 1 : c == DMB_ERR_INVAL);
        REQUIRE(i < r->h.geo.groups ? g == 0 || g == 1 : g == DMB_ERR_INVAL);
        if (c == 1)
            REQUIRE(strlen(ci.name) < DMB_NAME_MAX);
        REQUIRE(dmb_slot_info(&r->h, i % DMB_MAX_SLOTS, &si) == 0);
    }
    REQUIRE(dmb_stats(&r->h, &st) == 0);
}

static void op_slots(struct run *r)
{
    uint32_t which = take(r, 1);
    int k = which & 1;
    struct dmb_slot_info info;
    char client[DMB_CLIENT_MAX + 2];
    uint32_t clen = 1 + take(r, 1) % (DMB_CLIENT_MAX + 1);

    if (r->slot[k] >= 0 && which < 128) {
        dmb_slot_info(&r->h, (uint32_t)r->slot[k], &info);
        if (which < 64)
            result(r, dmb_slot_release(&r->h, (uint32_t)r->slot[k],
                                       info.gen));
        else
            result(r, dmb_slot_reclaim(&r->h, (uint32_t)r->slot[k],
                                       info.pid, info.start_time));
        r->slot[k] = -1;
        return;
    }
    for (uint32_t i = 0; i < clen; i++)
        client[i] = (char)('a' + take(r, 1) % 27); /* '{' is no letter */
    if (which == 255)
        client[0] = '!';
    r->slot[k] = dmb_slot_acquire(&r->h, 1000 + (int32_t)which, which,
                                  which, client, clen, r->now);
    if (r->slot[k] < 0)
        r->slot[k] = -1;
}

static void op_whole(struct run *r)
{
    uint32_t sel = take(r, 1);
    char name[128];
    uint32_t nlen;

    if (sel < 16)
        result(r, dmb_flush(&r->h));
    else if (sel < 128)
        result(r, dmb_expire(&r->h, r->now, (uint64_t)take(r, 1) * 64));
    else if (sel < 192) {
        nlen = pick_name(r, name, "c");
        result(r, dmb_purge(&r->h, name, nlen));
    } else if (sel < 224) {
        nlen = pick_name(r, name, "c");
        result(r, dmb_unwait(&r->h, (uint32_t)slot_of(r), name, nlen));
    } else
        REQUIRE(dmb_repair(&r->h) == 0);
}

/* ------------------------------------------------------------------ */
/* Damage.  Never the mutex; everything else is fair game.             */

static void poke(struct run *r, uint64_t off, const void *bytes, size_t n)
{
    for (size_t i = 0; i < n; i++, off++) {
        if (off >= r->h.size || (off >= LOCK_FIRST && off < LOCK_END))
            continue;
        r->base[off] = ((const unsigned char *)bytes)[i];
    }
    r->damaged = 1;
}

/* The 32-bit fields of each table's entries that hold links, lengths
 * and counts (byte offsets; see the structs at the top of _ring.c), and
 * 255 for "any word of the entry". */
struct table {
    uint32_t unit;
    uint8_t fields[8];
};

static const struct table tables[] = {
    {80, {0, 4, 8, 12, 48, 255, 255, 255}},                  /* slots */
    {168, {0, 4, 8, 12, 16, 20, 24, 28}},                    /* channels */
    {4, {0, 0, 0, 0, 0, 0, 0, 0}},                           /* buckets */
    {128, {0, 4, 8, 12, 16, 255, 255, 255}},                 /* groups */
    {4, {0, 0, 0, 0, 0, 0, 0, 0}},                           /* buckets */
    {32, {0, 4, 8, 12, 16, 20, 255, 255}},                   /* members */
    {4, {0, 0, 0, 0, 0, 0, 0, 0}},                           /* buckets */
    {24, {0, 4, 0, 4, 8, 16, 255, 255}},                     /* nodes */
    {DMB_BLOCK_SIZE, {0, 4, 8, 0, 8, 16, 255, 255}},         /* blocks */
};

/* An index-like value: small, in range of some table, just past one,
 * DMB_NONE, or arbitrary. */
static uint32_t index_like(struct run *r)
{
    uint32_t kind = take(r, 1), v = take(r, 4);
    const uint32_t edges[] = {r->h.geo.channels, r->h.geo.groups,
                              r->h.geo.members, r->h.geo.nodes,
                              r->h.geo.blocks, DMB_MAX_SLOTS};

    if (kind < 80)
        return v % 8;
    if (kind < 120)
        return v % (r->h.geo.blocks + 2);
    if (kind < 170)
        return edges[v % 6] + (v >> 8) % 3 - 1;
    if (kind < 200)
        return DMB_NONE;
    return v;
}

/* Overwrite a link, length or count of one table entry. */
static void op_damage_entry(struct run *r)
{
    const uint64_t offs[] = {
        r->h.off_slots, r->h.off_channels, r->h.off_channel_buckets,
        r->h.off_groups, r->h.off_group_buckets, r->h.off_members,
        r->h.off_member_buckets, r->h.off_nodes, r->h.off_blocks,
        r->h.off_marks,
    };
    uint32_t t = take(r, 1) % 9, near = take(r, 1);
    /* Entries in use sit at the low indices: free lists start at 0. */
    uint32_t index = near < 200 ? near % 8 : take(r, 2);
    const struct table *tb = &tables[t];
    uint32_t field = tb->fields[take(r, 1) % 8], v;
    uint64_t count = (offs[t + 1] - offs[t]) / tb->unit;

    if (field == 255)
        field = (take(r, 1) % (tb->unit / 4)) * 4;
    v = index_like(r);
    poke(r, offs[t] + (uint64_t)(index % count) * tb->unit + field, &v, 4);
}

static void op_damage_bytes(struct run *r)
{
    uint64_t off = take(r, 4) % r->h.end;
    uint32_t n = 1 + take(r, 1) % 8;

    for (uint32_t i = 0; i < n; i++) {
        unsigned char b = r->base[(off + i) % r->h.size] ^
                          (unsigned char)(1 + take(r, 1) % 255);

        poke(r, (off + i) % r->h.size, &b, 1);
    }
}

/* Header fields before the lock (magic, version, size, geometry) and the
 * free-list heads, counts and counters after it. */
static void op_damage_header(struct run *r)
{
    uint32_t at = take(r, 1) % 512 & ~3u, v = take(r, 4);

    poke(r, at, &v, 4);
}

/* ------------------------------------------------------------------ */
/* The checks after every program.                                     */

static void check_identity(struct dmb_handle *h)
{
    struct dmb_stats st;
    const struct dmb_counters *c = &st.counters;

    REQUIRE(dmb_stats(h, &st) == 0);
    REQUIRE(c->sent == c->received + c->expired + c->dropped_full +
                           c->dropped_dead + c->flushed + st.queued);
}

static void check_repair_is_stable(struct dmb_handle *h)
{
    struct dmb_stats a, b;
    struct dmb_channel_info ci;
    uint64_t depths = 0;

    REQUIRE(dmb_repair(h) == 0);
    REQUIRE(dmb_stats(h, &a) == 0);
    REQUIRE(dmb_repair(h) == 0);
    REQUIRE(dmb_stats(h, &b) == 0);
    REQUIRE(a.used_slots == b.used_slots);
    REQUIRE(a.used_channels == b.used_channels);
    REQUIRE(a.used_groups == b.used_groups);
    REQUIRE(a.used_members == b.used_members);
    REQUIRE(a.used_nodes == b.used_nodes);
    REQUIRE(a.used_blocks == b.used_blocks);
    REQUIRE(a.queued == b.queued);
    REQUIRE(a.queued == a.used_nodes);
    for (uint32_t i = 0; i < h->geo.channels; i++)
        if (dmb_channel_at(h, i, &ci) == 1)
            depths += ci.depth;
    REQUIRE(depths == a.queued);
    check_identity(h);
}

/* Empty everything; only channels that someone waits on may stay. */
static void check_drains(struct dmb_handle *h)
{
    struct dmb_channel_info ci;
    struct dmb_stats st;
    uint32_t waited = 0;

    for (uint32_t i = 0; i < h->geo.channels; i++)
        if (dmb_channel_at(h, i, &ci) == 1)
            REQUIRE(dmb_purge(h, ci.name, (uint32_t)strlen(ci.name)) >= 0);
    REQUIRE(dmb_flush(h) == 0);
    for (uint32_t i = 0; i < h->geo.channels; i++)
        if (dmb_channel_at(h, i, &ci) == 1) {
            REQUIRE(ci.depth == 0);
            waited += (ci.waiters[0] | ci.waiters[1]) != 0;
        }
    REQUIRE(dmb_stats(h, &st) == 0);
    REQUIRE(st.used_blocks == 0 && st.used_nodes == 0 && st.queued == 0);
    REQUIRE(st.used_members == 0 && st.used_groups == 0);
    REQUIRE(st.used_channels == waited);
    check_identity(h);
}

static void check_round_trip(struct run *r)
{
    struct dmb_wake wake;
    uint32_t len = 0, n = 4000;
    int s = dmb_slot_acquire(&r->h, 7, 7, 7, "fresh", 5, r->now);

    if (s < 0)
        s = 0;
    for (uint32_t i = 0; i < n; i++)
        payload[i] = (unsigned char)(i * 13u + 5u);
    REQUIRE(dmb_send(&r->h, (uint32_t)s, "zz.fresh", 8, 1, payload, n,
                     r->now, r->now + 1000, &wake) == 0);
    REQUIRE(dmb_recv(&r->h, (uint32_t)s, "zz.fresh", 8, 1, r->now, 0, rbuf,
                     sizeof(rbuf), &len) == 1);
    REQUIRE(len == n && memcmp(rbuf, payload, n) == 0);
}

/* ------------------------------------------------------------------ */

static void step(struct run *r)
{
    uint32_t op = take(r, 1);

    r->now += take(r, 1);
    switch (op % 19) {
    case 0: case 1: case 2: op_send(r); break;
    case 3: case 4: op_recv(r); break;
    case 5: op_group_add(r); break;
    case 6: op_group_discard(r); break;
    case 7: op_group_send(r); break;
    case 8: op_peek(r); break;
    case 9: op_members(r); break;
    case 10: op_slots(r); break;
    case 11: op_whole(r); break;
    case 12: op_damage_entry(r); break;
    case 13: op_damage_bytes(r); break;
    case 14: op_damage_header(r); break;
    case 15: op_move(r); break;
    case 16: op_settle(r); break;
    case 17: op_lookup(r); break;
    default: op_tables(r); break;
    }
}

/* A second process attaching to what the program left: it either
 * refuses with a reason or gets a handle whose tables fit the mapping. */
static void check_attach(struct run *r)
{
    struct dmb_handle h2;
    int rc = dmb_attach(&h2, r->base, SEG_SIZE);

    REQUIRE(rc == 0 || rc == DMB_ERR_MAGIC || rc == DMB_ERR_VERSION ||
            rc == DMB_ERR_SIZE || rc == DMB_ERR_CORRUPT ||
            rc == DMB_ERR_UNINIT);
    if (rc == 0)
        REQUIRE(h2.end <= SEG_SIZE && h2.size <= SEG_SIZE);
    if (!r->damaged)
        REQUIRE(rc == 0);
}

/* A formatted segment with slots 0 and 1 taken, copied from a template
 * made once: cheaper than formatting 1 MiB on every run.  The copy of an
 * unlocked process-shared mutex is an unlocked mutex. */
static unsigned char *fresh_segment(struct dmb_handle *h)
{
    static unsigned char *template;

    if (template == NULL) {
        segment = mmap(NULL, SEG_SIZE, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        template = malloc(SEG_SIZE);
        REQUIRE(segment != MAP_FAILED && template != NULL);
        REQUIRE(dmb_init(h, segment, SEG_SIZE, 1) == 0);
        REQUIRE(dmb_slot_acquire(h, 100, 1, 1, "alpha", 5, 0) == 0);
        REQUIRE(dmb_slot_acquire(h, 101, 1, 2, "beta", 4, 0) == 1);
        memcpy(template, segment, SEG_SIZE);
    }
    memcpy(segment, template, SEG_SIZE);
    REQUIRE(dmb_attach(h, segment, SEG_SIZE) == 0);
    return segment;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct run r;

    memset(&r, 0, sizeof(r));
    r.p = data;
    r.left = size;
    r.base = fresh_segment(&r.h);
    r.slot[0] = 0;
    r.slot[1] = 1;
    r.repair_on_corrupt = take(&r, 1) & 1;
    for (int steps = 0; r.left > 0 && steps < 300; steps++)
        step(&r);
    if (!r.damaged)
        check_identity(&r.h);
    check_attach(&r);
    check_repair_is_stable(&r.h);
    check_drains(&r.h);
    check_round_trip(&r);
    return 0;
}
