/* A program that keeps using its memory: fills MIB mebibytes with a pattern, prints "filled",
 * then reads, checks and rewrites the first quarter round after round, until a line (or end of
 * file) arrives on stdin: then it checks every word and prints "ok ROUNDS" (exit 0) or the
 * first wrong word (exit 1). Stops by itself after ten minutes (exit 2). For the ushering test. */
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t value(uint64_t i, uint64_t round) { return (i * 0x9E3779B97F4A7C15ull) ^ round; }

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 64;
    size_t n = mib << 17, hot = n / 4;
    uint64_t *w = malloc(n * sizeof *w);
    if (!w) {
        perror("malloc");
        return 3;
    }
    for (size_t i = 0; i < n; i++) w[i] = value(i, 1);
    printf("filled\n");
    fflush(stdout);
    uint64_t round = 1;
    time_t start = time(NULL);
    for (;;) {
        for (size_t i = 0; i < hot; i++) {
            if (w[i] != value(i, round)) {
                printf("bad word %zu in round %llu\n", i, (unsigned long long)round);
                return 1;
            }
            w[i] = value(i, round + 1);
        }
        round++;
        struct pollfd p = {.fd = 0, .events = POLLIN};
        if (poll(&p, 1, 0) > 0) break;
        if (time(NULL) - start > 600) return 2;
    }
    for (size_t i = 0; i < n; i++) {
        if (w[i] != value(i, i < hot ? round : 1)) {
            printf("bad word %zu at the end\n", i);
            return 1;
        }
    }
    printf("ok %llu\n", (unsigned long long)round);
    return 0;
}
