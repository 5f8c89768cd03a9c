/*
 * A shared counter and a histogram across the nodes of a DSM job, through the C API: every node
 * adds to one counter with atomic fetch-add (atomic across nodes: a page has one writer at a
 * time), to a second counter with a plain increment inside DSM lock 1, and fills its own bins
 * of a histogram; after a barrier every node checks all three.
 *   cc dsm_counter.c $(pkg-config --cflags --libs mosaic) -o dsm_counter
 *   mosrun -n 4 ./dsm_counter [ROUNDS]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "mosaic.h"

#define BINS 64

static int fail(const char *what) {
    fprintf(stderr, "dsm_counter: %s: %s\n", what, mosaic_last_error());
    return 1;
}

int main(int argc, char **argv) {
    uint64_t rounds = argc > 1 ? (uint64_t)atoll(argv[1]) : 1000;
    if (mosaic_init(NULL) != MOSAIC_OK) return fail("init");
    mosaic_dsm *job;
    if (mosaic_dsm_join(1 << 20, &job) != MOSAIC_OK) return fail("join");
    int rank = mosaic_dsm_rank(job), nodes = mosaic_dsm_nodes(job);
    /* The counter on the first page, the histogram on the second: pages of different homes. */
    uint64_t *counter = mosaic_dsm_ptr(job);
    uint64_t *bins = (uint64_t *)((char *)counter + 4096);
    volatile uint64_t *locked = (volatile uint64_t *)((char *)counter + 2 * 4096);
    for (uint64_t i = 0; i < rounds; i++) {
        __atomic_fetch_add(counter, 1, __ATOMIC_SEQ_CST);
        __atomic_fetch_add(&bins[(i * 7 + (uint64_t)rank) % BINS], 1, __ATOMIC_SEQ_CST);
        if (i % 10 == 0) {
            if (mosaic_dsm_lock(job, 1) != MOSAIC_OK) return fail("lock");
            *locked = *locked + 1;
            if (mosaic_dsm_unlock(job, 1) != MOSAIC_OK) return fail("unlock");
        }
    }
    if (mosaic_dsm_barrier(job) != MOSAIC_OK) return fail("barrier");
    uint64_t total = __atomic_load_n(counter, __ATOMIC_SEQ_CST), sum = 0;
    for (int b = 0; b < BINS; b++) sum += __atomic_load_n(&bins[b], __ATOMIC_SEQ_CST);
    uint64_t want = rounds * (uint64_t)nodes, want_locked = (rounds + 9) / 10 * (uint64_t)nodes;
    uint64_t got_locked = *locked;
    printf("dsm_counter: rank %d of %d: counter %llu, histogram total %llu (expected %llu), locked counter %llu "
           "(expected %llu)\n",
           rank, nodes, (unsigned long long)total, (unsigned long long)sum, (unsigned long long)want,
           (unsigned long long)got_locked, (unsigned long long)want_locked);
    if (mosaic_dsm_leave(job) != MOSAIC_OK) return fail("leave");
    if (mosaic_finalize() != MOSAIC_OK) return fail("finalize");
    return total == want && sum == want && got_locked == want_locked ? 0 : 1;
}
