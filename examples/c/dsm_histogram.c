/*
 * A parallel histogram across the nodes of a DSM job, with the C API's allocation and global
 * atomics: every node draws its share of pseudo-random samples into a block of its own arena
 * (mosaic_dsm_alloc_local: homed at that node) and publishes the block's address in a collective
 * directory (mosaic_dsm_alloc: the same address on every node); after a barrier every node adds
 * its samples to the shared bins with mosaic_dsm_fetch_add; after another, every node reads every
 * node's samples, computes the histogram alone and checks the shared bins against it.
 *   cc dsm_histogram.c $(pkg-config --cflags --libs mosaic) -o dsm_histogram
 *   mosrun -n 3 ./dsm_histogram [SAMPLES per node] [BINS]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "mosaic.h"

static int fail(const char *what) {
    fprintf(stderr, "dsm_histogram: %s: %s\n", what, mosaic_last_error());
    return 1;
}

/* Sample i of node `node`. */
static uint64_t sample(uint64_t node, uint64_t i) {
    uint64_t x = (node << 40 | i) * 0x9E3779B97F4A7C15ull;
    return x ^ (x >> 29);
}

int main(int argc, char **argv) {
    uint64_t samples = argc > 1 ? strtoull(argv[1], NULL, 10) : 4096;
    uint64_t bins = argc > 2 ? strtoull(argv[2], NULL, 10) : 64;
    if (samples == 0 || bins == 0) {
        fprintf(stderr, "usage: dsm_histogram [SAMPLES per node > 0] [BINS > 0], under mosrun -n N or mpirun\n");
        return 2;
    }
    if (mosaic_init(NULL) != MOSAIC_OK) return fail("init");
    mosaic_dsm *job;
    if (mosaic_dsm_join(1 << 20, &job) != MOSAIC_OK) return fail("join");
    uint64_t rank = (uint64_t)mosaic_dsm_rank(job), nodes = (uint64_t)mosaic_dsm_nodes(job), old;
    uint64_t *hist, *directory, *mine;
    if (mosaic_dsm_alloc(job, 8 * bins, (void **)&hist) != MOSAIC_OK) return fail("alloc bins");
    if (mosaic_dsm_alloc(job, 8 * nodes, (void **)&directory) != MOSAIC_OK) return fail("alloc directory");
    if (mosaic_dsm_alloc_local(job, 8 * samples, (void **)&mine) != MOSAIC_OK) return fail("alloc_local");
    for (uint64_t i = 0; i < samples; i++) mine[i] = sample(rank, i);
    if (mosaic_dsm_fetch_add(job, &directory[rank], (uint64_t)(uintptr_t)mine, &old) != MOSAIC_OK)
        return fail("publish");
    if (mosaic_dsm_barrier(job) != MOSAIC_OK) return fail("barrier");

    for (uint64_t i = 0; i < samples; i++)
        if (mosaic_dsm_fetch_add(job, &hist[mine[i] % bins], 1, &old) != MOSAIC_OK) return fail("fetch_add");
    if (mosaic_dsm_barrier(job) != MOSAIC_OK) return fail("barrier");

    uint64_t *want = calloc(bins, sizeof *want);
    if (!want) return 1;
    int ok = 1;
    for (uint64_t node = 0; node < nodes; node++) {
        const uint64_t *block = (const uint64_t *)(uintptr_t)__atomic_load_n(&directory[node], __ATOMIC_SEQ_CST);
        for (uint64_t i = 0; i < samples; i++) {
            if (block[i] != sample(node, i)) {
                fprintf(stderr, "dsm_histogram: node %llu's sample %llu is wrong\n", (unsigned long long)node,
                        (unsigned long long)i);
                ok = 0;
            }
            want[block[i] % bins]++;
        }
    }
    for (uint64_t b = 0; b < bins; b++) {
        if (hist[b] != want[b]) {
            fprintf(stderr, "dsm_histogram: bin %llu holds %llu, expected %llu\n", (unsigned long long)b,
                    (unsigned long long)hist[b], (unsigned long long)want[b]);
            ok = 0;
        }
    }
    free(want);
    printf("dsm_histogram: rank %llu of %llu: %llu samples in %llu bins: %s\n", (unsigned long long)rank,
           (unsigned long long)nodes, (unsigned long long)(samples * nodes), (unsigned long long)bins,
           ok ? "all bins right" : "WRONG");
    if (mosaic_dsm_leave(job) != MOSAIC_OK) return fail("leave");
    if (mosaic_finalize() != MOSAIC_OK) return fail("finalize");
    return ok ? 0 : 1;
}
