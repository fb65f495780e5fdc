/*
 * bench_core.c - dmb's C core alone: nanoseconds per send+receive pair.
 *
 * Measures, for each message size, on a segment in anonymous shared
 * memory (no Python, no wake-up descriptors):
 *
 *   memcpy     the floor: the message copied in and back out (two memcpy)
 *   pair       dmb_send then dmb_recv on one channel, one process
 *   stream     one process sends, a forked one receives (spinning, with
 *              sched_yield, when the channel is empty): ns per message
 *   pingpong   a message there and back between two processes, spinning:
 *              ns per round trip
 *
 * and, with 100-byte messages, a pair on a random one of N channels that
 * each hold one queued message ("channels"), N from 10 to 100,000, and
 * group_send to a group of 1 to 10,000 members ("group_send").
 *
 * Every received message carries its sequence number in its first 8
 * bytes; any loss or reordering makes the run fail.  Output is one JSON
 * object per line.  The clock passed to the core is read once per 256
 * operations, so the numbers are the core's alone.
 *
 *   bench_core [--quick]
 */
#define _GNU_SOURCE
#include "_ring.h"

#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SEGMENT_SIZE (256ull << 20)
#define SECOND 1000000000ull

static const uint32_t sizes[] = {100, 1000, 10000, 262144};

struct shared {
    volatile uint64_t done_ns;
    volatile int32_t errors;
    volatile int32_t ready;
};

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * SECOND + (uint64_t)ts.tv_nsec;
}

static void fail(const char *what, int rc)
{
    fprintf(stderr, "bench_core: %s failed (%d)\n", what, rc);
    exit(1);
}

static void *map_shared(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);

    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

static uint32_t take_slot(struct dmb_handle *h, const char *client)
{
    int rc = dmb_slot_acquire(h, getpid(), 1, (uint64_t)getpid() * 2 + 1,
                              client, (uint32_t)strlen(client), now_ns());

    if (rc < 0)
        fail("dmb_slot_acquire", rc);
    return (uint32_t)rc;
}

static void give_back(struct dmb_handle *h, uint32_t slot)
{
    struct dmb_slot_info info;

    if (dmb_slot_info(h, slot, &info) == 0)
        dmb_slot_release(h, slot, info.gen);
}

static void report(const char *bench, uint32_t size, uint64_t channels,
                   uint64_t ops, uint64_t ns, int errors)
{
    printf("{\"bench\": \"%s\", \"size\": %u, \"channels\": %llu, "
           "\"ops\": %llu, \"ns_per_op\": %.1f, \"errors\": %d}\n",
           bench, size, (unsigned long long)channels,
           (unsigned long long)ops, (double)ns / (double)ops, errors);
    fflush(stdout);
}

/* Keep the compiler from dropping copies nobody reads. */
static void clobber(void *p)
{
    __asm__ volatile("" : : "g"(p) : "memory");
}

static void bench_memcpy(uint32_t size, uint64_t ops)
{
    unsigned char *src = calloc(1, size), *mid = calloc(1, size),
                  *dst = calloc(1, size);
    uint64_t t0 = now_ns();

    for (uint64_t i = 0; i < ops; i++) {
        memcpy(src, &i, sizeof(i));
        memcpy(mid, src, size);
        clobber(mid);
        memcpy(dst, mid, size);
        clobber(dst);
    }
    report("memcpy", size, 1, ops, now_ns() - t0, 0);
    free(src);
    free(mid);
    free(dst);
}

static void bench_pair(struct dmb_handle *h, uint32_t slot, uint32_t size,
                       uint64_t ops)
{
    static const char name[] = "bench.core.pair";
    unsigned char *msg = calloc(1, size), *buf = calloc(1, size);
    struct dmb_wake wake;
    uint32_t len;
    int errors = 0;
    uint64_t now = now_ns(), t0 = now;

    for (uint64_t i = 0; i < ops; i++) {
        int rc;

        if ((i & 255) == 0)
            now = now_ns();
        memcpy(msg, &i, sizeof(i));
        rc = dmb_send(h, slot, name, sizeof(name) - 1, 1000, msg, size, now,
                      now + 60 * SECOND, &wake);
        if (rc < 0)
            fail("dmb_send", rc);
        rc = dmb_recv(h, slot, name, sizeof(name) - 1, 1000, now, 0, buf,
                      size, &len);
        if (rc != 1 || len != size || memcmp(buf, &i, sizeof(i)) != 0)
            errors++;
    }
    report("pair", size, 1, ops, now_ns() - t0, errors);
    free(msg);
    free(buf);
}

/* N channels, each holding one message; pairs on random ones of them. */
static void bench_channels(struct dmb_handle *h, uint32_t slot, uint32_t n,
                           uint64_t ops, uint64_t *next_seq, uint64_t *want)
{
    char name[64];
    unsigned char msg[100] = {0}, buf[100];
    struct dmb_wake wake;
    uint32_t len, rng = 12345;
    int errors = 0;
    uint64_t now = now_ns(), t0;

    for (uint32_t c = 0; c < n; c++) {
        int l = snprintf(name, sizeof(name), "bench.core.c%u", c);

        if (next_seq[c] != 0)
            continue; /* made by a smaller n */
        memcpy(msg, &next_seq[c], sizeof(uint64_t));
        if (dmb_send(h, slot, name, (uint32_t)l, 1000, msg, sizeof(msg), now,
                     now + 3600 * SECOND, &wake) < 0)
            fail("dmb_send (fill)", -1);
        next_seq[c] = 1;
    }
    t0 = now_ns();
    for (uint64_t i = 0; i < ops; i++) {
        uint32_t c;
        int l, rc;

        rng = rng * 1103515245u + 12345u;
        c = (rng >> 8) % n;
        l = snprintf(name, sizeof(name), "bench.core.c%u", c);
        if ((i & 255) == 0)
            now = now_ns();
        memcpy(msg, &next_seq[c], sizeof(uint64_t));
        rc = dmb_send(h, slot, name, (uint32_t)l, 1000, msg, sizeof(msg), now,
                      now + 3600 * SECOND, &wake);
        if (rc < 0)
            fail("dmb_send", rc);
        next_seq[c]++;
        rc = dmb_recv(h, slot, name, (uint32_t)l, 1000, now, 0, buf,
                      sizeof(buf), &len);
        if (rc != 1 || memcmp(buf, &want[c], sizeof(uint64_t)) != 0)
            errors++;
        want[c]++;
    }
    report("channels", 100, n, ops, now_ns() - t0, errors);
}

/* Like bench_channels, but the timed loop without any dmb call: the cost
 * of picking and naming a channel, to subtract. */
static void bench_channels_loop(uint32_t n, uint64_t ops)
{
    char name[64];
    uint32_t rng = 12345;
    uint64_t t0 = now_ns(), sum = 0;

    for (uint64_t i = 0; i < ops; i++) {
        rng = rng * 1103515245u + 12345u;
        sum += (uint64_t)snprintf(name, sizeof(name), "bench.core.c%u",
                                  (rng >> 8) % n);
        clobber(name);
    }
    report("channels_loop", 100, n, ops, now_ns() - t0, sum == 0);
}

/* Spin a while (a few microseconds), then let others run: the machine
 * may have fewer free CPUs than spinning processes. */
/* group_send to a group of n normal channels: ns per call. */
static void bench_group(struct dmb_handle *h, uint32_t slot, uint32_t n,
                        uint32_t rounds)
{
    char group[32], name[64];
    unsigned char msg[100] = {0};
    struct dmb_wake wake;
    uint32_t full, nospace, calls = 200000 / n;
    int gl = snprintf(group, sizeof(group), "bench.core.g%u", n), errors = 0;
    uint64_t now = now_ns(), total = 0;

    if (calls > 200)
        calls = 200;
    if (calls < 5)
        calls = 5;
    for (uint32_t c = 0; c < n; c++) {
        int l = snprintf(name, sizeof(name), "bench.core.g%u.%u", n, c);

        if (dmb_group_add(h, slot, group, (uint32_t)gl, name, (uint32_t)l,
                          100000, now) < 0)
            fail("dmb_group_add", -1);
    }
    for (uint32_t r = 0; r < rounds; r++) {
        uint64_t t0 = now_ns();

        for (uint32_t k = 0; k < calls; k++) {
            int rc = dmb_group_send(h, group, (uint32_t)gl, msg, sizeof(msg),
                                    now, now + 3600 * SECOND,
                                    86400 * SECOND, &full, &nospace, &wake);

            if (rc != (int)n)
                errors++;
        }
        total += now_ns() - t0;
        for (uint32_t c = 0; c < n; c++) {
            int l = snprintf(name, sizeof(name), "bench.core.g%u.%u", n, c);

            dmb_purge(h, name, (uint32_t)l);
        }
    }
    report("group_send", 100, n, (uint64_t)calls * rounds, total, errors);
    for (uint32_t c = 0; c < n; c++) {
        int l = snprintf(name, sizeof(name), "bench.core.g%u.%u", n, c);

        dmb_group_discard(h, group, (uint32_t)gl, name, (uint32_t)l);
    }
}

static void spin_pause(unsigned *spins)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ volatile("pause");
#endif
    if (++*spins > 4000) {
        sched_yield();
        *spins = 0;
    }
}

static void bench_stream(struct dmb_handle *h, uint32_t size, uint64_t ops,
                         struct shared *sh)
{
    static const char name[] = "bench.core.stream";
    unsigned char *msg = calloc(1, size);
    struct dmb_wake wake;
    uint32_t slot = take_slot(h, "sender");
    uint64_t t0;
    pid_t child;

    sh->done_ns = 0;
    sh->errors = 0;
    sh->ready = 0;
    child = fork();
    if (child < 0) {
        perror("fork");
        exit(1);
    }
    if (child == 0) {
        unsigned char *buf = calloc(1, size);
        uint32_t me = take_slot(h, "receiver"), len;
        unsigned spins = 0;
        int errors = 0;

        sh->ready = 1;
        for (uint64_t i = 0; i < ops;) {
            int rc = dmb_recv(h, me, name, sizeof(name) - 1, 1000, now_ns(),
                              0, buf, size, &len);

            if (rc == 0) {
                spin_pause(&spins);
                continue;
            }
            if (rc != 1 || memcmp(buf, &i, sizeof(i)) != 0)
                errors++;
            i++;
        }
        sh->done_ns = now_ns();
        sh->errors = errors;
        _exit(0);
    }
    while (!sh->ready)
        sched_yield();
    t0 = now_ns();
    {
        uint64_t now = t0;
        unsigned spins = 0;

        for (uint64_t i = 0; i < ops;) {
            int rc;

            if ((i & 255) == 0)
                now = now_ns();
            memcpy(msg, &i, sizeof(i));
            rc = dmb_send(h, slot, name, sizeof(name) - 1, 1000, msg, size,
                          now, now + 60 * SECOND, &wake);
            if (rc == DMB_ERR_FULL || rc == DMB_ERR_NOSPACE) {
                spin_pause(&spins);
                continue;
            }
            if (rc < 0)
                fail("dmb_send", rc);
            i++;
        }
    }
    waitpid(child, NULL, 0);
    report("stream", size, 1, ops, sh->done_ns - t0, sh->errors);
    give_back(h, slot);
    free(msg);
}

static void bench_pingpong(struct dmb_handle *h, uint32_t size, uint64_t ops,
                           struct shared *sh)
{
    static const char ping[] = "bench.core.ping", pong[] = "bench.core.pong";
    unsigned char *msg = calloc(1, size), *buf = calloc(1, size);
    struct dmb_wake wake;
    uint32_t slot = take_slot(h, "pinger"), len;
    unsigned spins = 0;
    int errors = 0;
    uint64_t t0;
    pid_t child;

    sh->ready = 0;
    child = fork();
    if (child < 0) {
        perror("fork");
        exit(1);
    }
    if (child == 0) {
        uint32_t me = take_slot(h, "ponger");

        sh->ready = 1;
        for (uint64_t i = 0; i < ops;) {
            uint64_t now = now_ns();
            int rc = dmb_recv(h, me, ping, sizeof(ping) - 1, 1000, now, 0,
                              buf, size, &len);

            if (rc == 0) {
                spin_pause(&spins);
                continue;
            }
            if (rc != 1 ||
                dmb_send(h, me, pong, sizeof(pong) - 1, 1000, buf, len, now,
                         now + 60 * SECOND, &wake) < 0)
                _exit(2);
            i++;
        }
        _exit(0);
    }
    while (!sh->ready)
        sched_yield();
    t0 = now_ns();
    for (uint64_t i = 0; i < ops; i++) {
        uint64_t now = now_ns();
        int rc;

        memcpy(msg, &i, sizeof(i));
        rc = dmb_send(h, slot, ping, sizeof(ping) - 1, 1000, msg, size, now,
                      now + 60 * SECOND, &wake);
        if (rc < 0)
            fail("dmb_send", rc);
        while ((rc = dmb_recv(h, slot, pong, sizeof(pong) - 1, 1000, now_ns(),
                              0, buf, size, &len)) == 0)
            spin_pause(&spins);
        if (rc != 1 || memcmp(buf, &i, sizeof(i)) != 0)
            errors++;
    }
    report("pingpong", size, 1, ops, now_ns() - t0, errors);
    waitpid(child, NULL, 0);
    give_back(h, slot);
    free(msg);
    free(buf);
}

int main(int argc, char **argv)
{
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    uint64_t scale = quick ? 10 : 1;
    struct dmb_handle h;
    void *base = map_shared(SEGMENT_SIZE);
    struct shared *sh = map_shared(sizeof(struct shared));
    static const uint32_t counts[] = {10, 100, 1000, 10000, 100000};
    uint64_t *next_seq = calloc(100000, sizeof(uint64_t));
    uint64_t *want = calloc(100000, sizeof(uint64_t));
    uint32_t slot;
    int rc;

    signal(SIGPIPE, SIG_IGN);
    rc = dmb_init(&h, base, SEGMENT_SIZE, 0);
    if (rc)
        fail("dmb_init", rc);
    slot = take_slot(&h, "main");
    for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
        uint32_t size = sizes[k];
        uint64_t ops = (size >= 100000 ? 20000 : 1000000) / scale;
        uint64_t cross = (size >= 100000 ? 5000 : 200000) / scale;

        bench_memcpy(size, ops);
        bench_pair(&h, slot, size, ops);
        bench_stream(&h, size, cross, sh);
        bench_pingpong(&h, size, cross / 4, sh);
    }
    for (size_t k = 0; k < sizeof(counts) / sizeof(counts[0]); k++) {
        bench_channels(&h, slot, counts[k], 1000000 / scale, next_seq, want);
        bench_channels_loop(counts[k], 1000000 / scale);
    }
    for (uint32_t n = 1; n <= 10000; n *= 10)
        bench_group(&h, slot, n, quick ? 2 : 10);
    return 0;
}
