/*
 * An ordinary program that knows nothing of Mosaic: allocates SIZE MiB in 4 MiB blocks
 * (malloc, calloc, realloc, posix_memalign), fills them, reads them back and prints a checksum.
 * Under mosrun with a smaller budget, its output must not change.
 *   bigalloc [SIZE_MIB]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 256;
    size_t blocks = mib / 4, block = 4u << 20;
    uint64_t **b = malloc(blocks * sizeof *b);
    if (!b) return 2;
    for (size_t i = 0; i < blocks; i++) {
        switch (i % 4) {
        case 0: b[i] = malloc(block); break;
        case 1: b[i] = calloc(block / 8, 8); break;
        case 2: if (posix_memalign((void **)&b[i], 1 << 16, block)) b[i] = NULL; break;
        default: b[i] = realloc(malloc(block / 2), block); break;
        }
        if (!b[i]) { fprintf(stderr, "allocation %zu failed\n", i); return 2; }
        for (size_t k = 0; k < block / 8; k++) b[i][k] = (i * 1000003u) ^ k;
    }
    uint64_t sum = 0;
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < blocks; i++)
            for (size_t k = 0; k < block / 8; k += 7) sum = sum * 31 + b[i][k];
    for (size_t i = 0; i < blocks; i++) free(b[i]);
    free(b);
    printf("checksum %016llx over %zu MiB\n", (unsigned long long)sum, mib);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    fprintf(stderr, "maxrss_kib %ld\n", ru.ru_maxrss);
    return 0;
}
