/*
 * Touches MIB MiB (default 128) at random, ITERS times: reads every access, writes every other;
 * prints the sum of what it read, and its peak RSS every 100,000 accesses on stderr. The probe that found the pager keeping an entry per page drop
 * (BENCHMARKS.md, 2026-12-03 evening):
 *   cc -O2 -o random_touch benches/scripts/random_touch.c
 *   target/release/mosrun --local-budget 16M -- ./random_touch 600000 [MIB]
 */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <sys/resource.h>
int main(int argc, char **argv) {
    long iters = argc > 1 ? atol(argv[1]) : 400000;
    size_t mb = argc > 2 ? (size_t)atol(argv[2]) : 128, n = mb << 20;
    if (mb == 0) { fprintf(stderr, "usage: random_touch [ITERS] [MIB > 0]\n"); return 2; }
    unsigned char *p = malloc(n);
    for (size_t i = 0; i < n; i += 4096) p[i] = i;
    uint64_t x = 88172645463325252ull, s = 0;
    for (long k = 0; k < iters; k++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        size_t i = x % n;
        s += p[i]; if (k & 1) p[i] = k;
        if (k % 100000 == 0) { struct rusage ru; getrusage(RUSAGE_SELF, &ru); fprintf(stderr, "k=%ld maxrss %ld\n", k, ru.ru_maxrss); }
    }
    printf("%llu\n", (unsigned long long)s);
    return 0;
}
