/*
 * Forks 20 times from a process holding 32 MiB; each child reads one page of it and exits.
 * Prints the time per fork, child and wait (BENCHMARKS.md, 2026-12-03 evening):
 *   cc -O2 -o fork_latency benches/scripts/fork_latency.c
 *   ./fork_latency; target/release/mosrun --local-budget 16M -- ./fork_latency
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(void) {
    size_t n = 32 << 20;
    char *p = malloc(n);
    memset(p, 1, n);
    double t0 = now();
    for (int i = 0; i < 20; i++) {
        pid_t c = fork();
        if (c == 0) _exit(p[i * 4096] == 1 ? 0 : 1);
        int st; waitpid(c, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st)) { printf("child failed\n"); return 1; }
    }
    printf("fork+touch+exit+wait: %.2f ms each\n", (now() - t0) / 20 * 1e3);
    return 0;
}
