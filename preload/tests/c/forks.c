/*
 * An ordinary program that forks: a parent fills SIZE MiB, forks two children and a grandchild;
 * each checks it sees the parent's memory as of its fork, writes its own, frees and allocates
 * again, and prints checksums. The parent writes after the forks and checks that no child's
 * writes reached it. Under mosrun, its output must not change.
 *   forks [SIZE_MIB]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

static uint64_t sum_of(const uint64_t *p, size_t n) {
    uint64_t s = 0;
    for (size_t k = 0; k < n; k++) s = (s ^ p[k]) * 0x100000001b3ull;
    return s;
}

static void fill(uint64_t *p, size_t n, uint64_t seed) {
    for (size_t k = 0; k < n; k++) p[k] = (k * 0x9E3779B97F4A7C15ull) ^ seed;
}

/* What a child does: check, write, allocate; its exit status is 0 if all held. */
static int child(const char *name, uint64_t *p, size_t n, uint64_t expect, uint64_t seed) {
    uint64_t seen = sum_of(p, n);
    fill(p, n / 2, seed);
    uint64_t *fresh = malloc(n * sizeof *p / 4);
    if (!fresh) return 3;
    fill(fresh, n / 4, seed + 1);
    printf("%s: inherited %s, own %016llx, fresh %016llx\n", name, seen == expect ? "intact" : "CHANGED",
           (unsigned long long)sum_of(p, n), (unsigned long long)sum_of(fresh, n / 4));
    free(fresh);
    fflush(stdout);
    return seen == expect ? 0 : 1;
}

static int wait_ok(pid_t pid) {
    int st;
    if (waitpid(pid, &st, 0) != pid) return 0;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 64;
    size_t n = (mib << 20) / 8;
    uint64_t *p = malloc(n * 8);
    if (!p) return 2;
    fill(p, n, 1);
    uint64_t at_fork = sum_of(p, n);
    printf("parent: %016llx\n", (unsigned long long)at_fork);
    fflush(stdout);
    int ok = 1;
    for (int c = 0; c < 2; c++) {
        pid_t pid = fork();
        if (pid < 0) return 2;
        if (pid == 0) {
            char name[16];
            snprintf(name, sizeof name, "child %d", c);
            int rc = child(name, p, n, at_fork, 100 + c);
            if (c == 1 && rc == 0) {
                /* A grandchild forked from a child's own memory. */
                uint64_t mine = sum_of(p, n);
                pid_t g = fork();
                if (g == 0) _exit(child("grandchild", p, n, mine, 300));
                rc = wait_ok(g) ? 0 : 1;
            }
            _exit(rc);
        }
        ok &= wait_ok(pid);
    }
    /* Writes after the forks are the parent's own, and the children's never arrived. */
    int intact = sum_of(p, n) == at_fork;
    fill(p + n / 2, n / 2, 7);
    printf("parent: children %s, memory %s, now %016llx\n", ok ? "ok" : "FAILED", intact ? "intact" : "CHANGED",
           (unsigned long long)sum_of(p, n));
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    fprintf(stderr, "maxrss_kib %ld\n", ru.ru_maxrss);
    free(p);
    return ok && intact ? 0 : 1;
}
