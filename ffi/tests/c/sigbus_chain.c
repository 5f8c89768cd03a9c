/*
 * A program with its own SIGBUS handler, installed after Mosaic's (which serves faults on the
 * faulting thread), with sigaction and then with signal: faults in the network-RAM region are
 * still served (the program's handler never sees them), and a SIGBUS of the program's own (an
 * access past the end of a truncated file mapping) still reaches the program's handler.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mosaic.h"

static sigjmp_buf back;
static volatile sig_atomic_t seen;
static void *volatile seen_addr;

static void on_bus_info(int sig, siginfo_t *info, void *ctx) {
    (void)sig;
    (void)ctx;
    seen++;
    seen_addr = info->si_addr;
    siglongjmp(back, 1);
}

static void on_bus_plain(int sig) {
    (void)sig;
    seen++;
    siglongjmp(back, 1);
}

#define CHECK(c)                                                                   \
    do {                                                                           \
        if (!(c)) {                                                                \
            fprintf(stderr, "%s:%d: check failed: %s (%s)\n", __FILE__, __LINE__, #c, \
                    mosaic_last_error());                                          \
            return 1;                                                              \
        }                                                                          \
    } while (0)

/* Touches every page of the region, writing and reading back: all served by Mosaic. */
static int use_region(unsigned char *p, size_t len) {
    for (size_t i = 0; i < len; i += 4096) p[i] = (unsigned char)(i / 4096 * 7);
    for (size_t i = 0; i < len; i += 4096)
        if (p[i] != (unsigned char)(i / 4096 * 7)) return 0;
    return 1;
}

/* An access past the end of a file mapping: the kernel's SIGBUS, not Mosaic's. */
static int own_sigbus(void) {
    FILE *f = tmpfile();
    if (!f) return 0;
    if (ftruncate(fileno(f), 4096) != 0) return 0;
    unsigned char *m = mmap(NULL, 2 * 4096, PROT_READ, MAP_SHARED, fileno(f), 0);
    if (m == MAP_FAILED) return 0;
    int before = seen;
    if (sigsetjmp(back, 1) == 0) {
        volatile unsigned char x = m[4096]; /* beyond the file's end */
        (void)x;
    }
    munmap(m, 2 * 4096);
    fclose(f);
    return seen == before + 1;
}

int main(void) {
    CHECK(mosaic_init("sigchain-test-cluster-key-0123") == MOSAIC_OK);
    mosaic_memserver *server = NULL;
    CHECK(mosaic_memserver_start("tcp://127.0.0.1:0", 64u << 20, &server) == MOSAIC_OK);
    mosaic_netram_options o;
    mosaic_netram_options_init(&o); /* faults on the faulting thread: Mosaic's SIGBUS handler */
    o.servers = mosaic_memserver_uri(server);
    o.size = 16u << 20;
    o.resident_budget = 4u << 20;
    mosaic_netram *r;
    CHECK(mosaic_netram_create(&o, &r) == MOSAIC_OK);
    unsigned char *p = mosaic_netram_ptr(r);
    size_t len = mosaic_netram_size(r);

    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_bus_info;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGBUS, &sa, &old) == 0);
    CHECK(old.sa_handler == SIG_DFL); /* what the program had: the default */
    CHECK(use_region(p, len));
    CHECK(seen == 0);
    CHECK(own_sigbus());
    CHECK(seen_addr != NULL);
    /* The program asks what is installed: its own handler. */
    CHECK(sigaction(SIGBUS, NULL, &old) == 0);
    CHECK(old.sa_sigaction == on_bus_info);

    CHECK(signal(SIGBUS, on_bus_plain) != SIG_ERR);
    CHECK(use_region(p, len));
    CHECK(own_sigbus());
    CHECK(seen == 2);
    printf("sigbus chain: region faults served, %d SIGBUS of the program's own delivered\n", (int)seen);

    CHECK(mosaic_netram_destroy(r) == MOSAIC_OK);
    CHECK(mosaic_memserver_stop(server) == MOSAIC_OK);
    CHECK(mosaic_finalize() == MOSAIC_OK);
    return 0;
}
