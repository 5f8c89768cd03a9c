/*
 * Every function of mosaic.h, including the error paths: NULL handles and arguments, a double
 * destroy, wrong sizes, an unreachable server, calls before mosaic_init, finalize with live
 * handles. Then real use: an in-process memory server and a region four times its resident
 * budget, filled and checksummed. Built with -Wall -Wextra -Werror, plain and under
 * AddressSanitizer, by .ci/run (see ffi/tests/c/run.sh). DSM's calls: their error paths, and a
 * job of one node.
 */
#define _DEFAULT_SOURCE /* mkdtemp, setenv */
#include <pthread.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mosaic.h"

static int failures = 0;

#define CHECK(cond)                                                                         \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            fprintf(stderr, "FAILED %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, #cond, \
                    mosaic_last_error());                                                   \
            failures++;                                                                     \
        }                                                                                   \
    } while (0)

#define EXPECT(call, status) CHECK((call) == (status))

static const char *KEY = "c-test-cluster-key-0123456789";

static void before_init(void) {
    mosaic_netram_options opts;
    mosaic_netram *r = (mosaic_netram *)0x1;
    mosaic_memserver *s = NULL;
    EXPECT(mosaic_netram_options_init(&opts), MOSAIC_OK);
    opts.size = 1 << 20;
    opts.servers = "tcp://127.0.0.1:1";
    EXPECT(mosaic_netram_create(&opts, &r), MOSAIC_ERR_NOT_INITIALIZED);
    CHECK(r == NULL); /* the out-pointer is cleared on failure */
    CHECK(strstr(mosaic_last_error(), "mosaic_init") != NULL);
    EXPECT(mosaic_memserver_start("tcp://127.0.0.1:0", 1 << 20, &s), MOSAIC_ERR_NOT_INITIALIZED);
    EXPECT(mosaic_finalize(), MOSAIC_ERR_NOT_INITIALIZED);
    EXPECT(mosaic_init("short"), MOSAIC_ERR_INVALID); /* keys have at least 16 bytes */
    CHECK(strlen(mosaic_last_error()) > 0);
}

static void strings(void) {
    for (int s = 0; s <= 10; s++) {
        const char *m = mosaic_strerror(s);
        CHECK(m != NULL && strlen(m) > 0);
    }
    CHECK(strcmp(mosaic_strerror(0), "success") == 0);
    CHECK(strcmp(mosaic_strerror(-1), "unknown status") == 0);
    CHECK(strcmp(mosaic_strerror(12345), "unknown status") == 0);
}

static void null_arguments(void) {
    mosaic_netram_options opts;
    mosaic_netram *r = NULL;
    mosaic_netram_stats st;
    mosaic_memserver *s = NULL;
    EXPECT(mosaic_netram_options_init(NULL), MOSAIC_ERR_NULL);
    EXPECT(mosaic_netram_create(NULL, &r), MOSAIC_ERR_NULL);
    EXPECT(mosaic_netram_options_init(&opts), MOSAIC_OK);
    EXPECT(mosaic_netram_create(&opts, NULL), MOSAIC_ERR_NULL);
    CHECK(mosaic_netram_ptr(NULL) == NULL);
    CHECK(mosaic_netram_size(NULL) == 0);
    EXPECT(mosaic_netram_get_stats(NULL, &st), MOSAIC_ERR_NULL);
    EXPECT(mosaic_netram_destroy(NULL), MOSAIC_ERR_NULL);
    EXPECT(mosaic_memserver_start(NULL, 1 << 20, &s), MOSAIC_ERR_NULL);
    EXPECT(mosaic_memserver_start("tcp://127.0.0.1:0", 1 << 20, NULL), MOSAIC_ERR_NULL);
    CHECK(mosaic_memserver_uri(NULL) == NULL);
    EXPECT(mosaic_memserver_stop(NULL), MOSAIC_ERR_NULL);
    /* A pointer that is not a handle at all. */
    mosaic_netram *bogus = (mosaic_netram *)&opts;
    EXPECT(mosaic_netram_destroy(bogus), MOSAIC_ERR_BAD_HANDLE);
    EXPECT(mosaic_netram_get_stats(bogus, &st), MOSAIC_ERR_BAD_HANDLE);
    CHECK(mosaic_netram_ptr(bogus) == NULL);
}

static void bad_options(const char *server) {
    mosaic_netram_options opts;
    mosaic_netram *r = NULL;
    EXPECT(mosaic_netram_options_init(&opts), MOSAIC_OK);
    opts.servers = server;
    opts.size = 0; /* no size */
    EXPECT(mosaic_netram_create(&opts, &r), MOSAIC_ERR_INVALID);
    opts.size = 8 << 20;
    opts.resident_budget = 4096; /* below the minimum budget */
    EXPECT(mosaic_netram_create(&opts, &r), MOSAIC_ERR_INVALID);
    CHECK(strstr(mosaic_last_error(), "budget") != NULL);
    opts.resident_budget = 1 << 20;
    opts.fault_mode = 7;
    EXPECT(mosaic_netram_create(&opts, &r), MOSAIC_ERR_INVALID);
    opts.fault_mode = MOSAIC_FAULT_THREAD;
    opts.copies = 2; /* two copies on one server */
    EXPECT(mosaic_netram_create(&opts, &r), MOSAIC_ERR_INVALID);
    opts.copies = 0;
    opts.servers = "tcp://127.0.0.1:1"; /* nobody listens there */
    EXPECT(mosaic_netram_create(&opts, &r), MOSAIC_ERR_UNREACHABLE);
    CHECK(strstr(mosaic_last_error(), "tcp://127.0.0.1:1") != NULL);
    opts.servers = "not-a-uri";
    CHECK(mosaic_netram_create(&opts, &r) != MOSAIC_OK);
    CHECK(r == NULL);
}

static uint64_t mix(uint64_t i) { return i * 0x9E3779B97F4A7C15ull ^ (i >> 7); }

/* DSM's calls without a job around them: clear errors, no crash. */
static void dsm_without_a_job(void) {
    mosaic_dsm *d = (mosaic_dsm *)0x1;
    unsetenv("MOSAIC_DSM_RANK");
    EXPECT(mosaic_dsm_join(1 << 20, &d), MOSAIC_ERR_INVALID);
    CHECK(d == NULL);
    CHECK(strstr(mosaic_last_error(), "MOSAIC_DSM_RANK") != NULL);
    EXPECT(mosaic_dsm_join(1 << 20, NULL), MOSAIC_ERR_NULL);
    CHECK(mosaic_dsm_ptr(NULL) == NULL);
    CHECK(mosaic_dsm_bytes(NULL) == 0);
    CHECK(mosaic_dsm_rank(NULL) == -1);
    CHECK(mosaic_dsm_nodes(NULL) == 0);
    EXPECT(mosaic_dsm_barrier(NULL), MOSAIC_ERR_NULL);
    EXPECT(mosaic_dsm_leave(NULL), MOSAIC_ERR_NULL);
    mosaic_dsm *bogus = (mosaic_dsm *)&d;
    EXPECT(mosaic_dsm_barrier(bogus), MOSAIC_ERR_BAD_HANDLE);
    EXPECT(mosaic_dsm_leave(bogus), MOSAIC_ERR_BAD_HANDLE);
    /* A job of one node works without any other process. */
    char dir[] = "/tmp/mosaic-c-dsm-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    setenv("MOSAIC_DSM_RANK", "0", 1);
    setenv("MOSAIC_DSM_SIZE", "1", 1);
    setenv("MOSAIC_DSM_RENDEZVOUS", dir, 1);
    EXPECT(mosaic_dsm_join(12345, &d), MOSAIC_ERR_INVALID); /* not whole pages */
    EXPECT(mosaic_dsm_join(1 << 20, &d), MOSAIC_OK);
    CHECK(mosaic_dsm_rank(d) == 0 && mosaic_dsm_nodes(d) == 1 && mosaic_dsm_bytes(d) == 1 << 20);
    uint64_t *w = mosaic_dsm_ptr(d);
    CHECK(w != NULL);
    if (w) {
        w[1000] = 42;
        CHECK(w[1000] == 42 && w[0] == 0);
    }
    /* Allocation: collective and local blocks, reuse, and their errors. */
    void *a = NULL, *b = NULL, *l = NULL;
    EXPECT(mosaic_dsm_alloc(d, 100, &a), MOSAIC_OK);
    CHECK(a != NULL && (uintptr_t)a % 64 == 0 && (char *)a >= (char *)w && (char *)a < (char *)w + (1 << 20));
    EXPECT(mosaic_dsm_alloc(d, 2 << 20, &b), MOSAIC_ERR_NO_SPACE);
    CHECK(strcmp(mosaic_strerror(MOSAIC_ERR_NO_SPACE), "unknown status") != 0);
    CHECK(b == NULL && strstr(mosaic_last_error(), "no room") != NULL);
    EXPECT(mosaic_dsm_alloc(d, 0, &b), MOSAIC_ERR_INVALID);
    EXPECT(mosaic_dsm_alloc(d, 8, NULL), MOSAIC_ERR_NULL);
    EXPECT(mosaic_dsm_alloc(NULL, 8, &b), MOSAIC_ERR_NULL);
    EXPECT(mosaic_dsm_free(d, a), MOSAIC_OK);
    EXPECT(mosaic_dsm_free(d, a), MOSAIC_ERR_INVALID); /* freed twice */
    EXPECT(mosaic_dsm_alloc(d, 64, &b), MOSAIC_OK);
    CHECK(b == a); /* reused */
    EXPECT(mosaic_dsm_alloc_local(d, 3 * 4096, &l), MOSAIC_OK);
    CHECK(l != NULL && (uintptr_t)l % 4096 == 0 && (char *)l >= (char *)w + (1 << 20)); /* past the heap */
    EXPECT(mosaic_dsm_free_local(d, b), MOSAIC_ERR_INVALID); /* a collective block */
    EXPECT(mosaic_dsm_free_local(d, l), MOSAIC_OK);
    /* Atomics on region words, and their errors. */
    uint64_t old = 7;
    EXPECT(mosaic_dsm_fetch_add(d, (uint64_t *)b, 5, &old), MOSAIC_OK);
    CHECK(old == 0);
    EXPECT(mosaic_dsm_compare_exchange(d, (uint64_t *)b, 4, 9, &old), MOSAIC_OK);
    CHECK(old == 5 && *(uint64_t *)b == 5); /* not 4: unchanged */
    EXPECT(mosaic_dsm_compare_exchange(d, (uint64_t *)b, 5, 9, &old), MOSAIC_OK);
    CHECK(old == 5 && *(uint64_t *)b == 9);
    EXPECT(mosaic_dsm_fetch_add(d, (uint64_t *)((char *)b + 4), 1, &old), MOSAIC_ERR_INVALID); /* misaligned */
    CHECK(strstr(mosaic_last_error(), "aligned") != NULL);
    EXPECT(mosaic_dsm_fetch_add(d, &old, 1, &old), MOSAIC_ERR_INVALID); /* not in the region */
    EXPECT(mosaic_dsm_fetch_add(d, (uint64_t *)b, 1, NULL), MOSAIC_ERR_NULL);
    EXPECT(mosaic_dsm_free(d, b), MOSAIC_OK);
    EXPECT(mosaic_dsm_unlock(d, 3), MOSAIC_ERR_INVALID); /* not held */
    EXPECT(mosaic_dsm_lock(d, 3), MOSAIC_OK);
    EXPECT(mosaic_dsm_unlock(d, 3), MOSAIC_OK);
    EXPECT(mosaic_dsm_lock(NULL, 3), MOSAIC_ERR_NULL);
    EXPECT(mosaic_dsm_barrier(d), MOSAIC_OK);
    EXPECT(mosaic_dsm_leave(d), MOSAIC_OK);
    EXPECT(mosaic_dsm_leave(d), MOSAIC_ERR_BAD_HANDLE);
    unsetenv("MOSAIC_DSM_RANK");
    unsetenv("MOSAIC_DSM_SIZE");
    unsetenv("MOSAIC_DSM_RENDEZVOUS");
    rmdir(dir);
}

static void real_use(const char *server, uint32_t fault_mode) {
    mosaic_netram_options opts;
    mosaic_netram *r = NULL;
    mosaic_netram_stats st;
    EXPECT(mosaic_netram_options_init(&opts), MOSAIC_OK);
    opts.servers = server;
    opts.size = 8 << 20;
    opts.resident_budget = 2 << 20; /* a quarter of the region */
    opts.fault_mode = fault_mode;
    EXPECT(mosaic_netram_create(&opts, &r), MOSAIC_OK);
    if (r == NULL) return;
    uint64_t *w = (uint64_t *)mosaic_netram_ptr(r);
    uint64_t n = mosaic_netram_size(r) / sizeof(uint64_t);
    CHECK(w != NULL && n == (8 << 20) / 8);
    uint64_t sum = 0, check = 0;
    for (uint64_t i = 0; i < n; i++) {
        w[i] = mix(i);
        sum += mix(i);
    }
    for (uint64_t i = 0; i < n; i++) check += w[i];
    CHECK(sum == check);
    EXPECT(mosaic_netram_get_stats(r, &st), MOSAIC_OK);
    CHECK(st.evicted > 0 && st.written_back > 0 && st.lost == 0);
    EXPECT(mosaic_netram_get_stats(r, NULL), MOSAIC_ERR_NULL);
    EXPECT(mosaic_finalize(), MOSAIC_ERR_BUSY); /* a live region */
    EXPECT(mosaic_netram_destroy(r), MOSAIC_OK);
    EXPECT(mosaic_netram_destroy(r), MOSAIC_ERR_BAD_HANDLE); /* double free refused */
    CHECK(mosaic_netram_ptr(r) == NULL);
    CHECK(mosaic_netram_size(r) == 0);
    printf("fault mode %u: %llu pages fetched, %llu evicted, %llu written back, checksum ok\n", fault_mode,
           (unsigned long long)st.fetched, (unsigned long long)st.evicted, (unsigned long long)st.written_back);
}

/* Regions created, used and destroyed by several threads at once. */
struct worker { const char *server; int id; int ok; };

static void *worker_main(void *arg) {
    struct worker *w = arg;
    mosaic_netram_options o;
    mosaic_netram *r = NULL;
    if (mosaic_netram_options_init(&o) != MOSAIC_OK) return NULL;
    o.servers = w->server;
    o.size = 4 << 20;
    o.resident_budget = 1 << 20;
    if (mosaic_netram_create(&o, &r) != MOSAIC_OK) return NULL;
    uint64_t *p = mosaic_netram_ptr(r);
    uint64_t n = mosaic_netram_size(r) / 8, sum = 0;
    for (uint64_t i = 0; i < n; i++) p[i] = mix(i + (uint64_t)w->id);
    for (uint64_t i = 0; i < n; i++) sum += p[i] - mix(i + (uint64_t)w->id);
    w->ok = sum == 0 && mosaic_netram_destroy(r) == MOSAIC_OK;
    return NULL;
}

static void threads(const char *server) {
    pthread_t t[4];
    struct worker w[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (struct worker){server, i, 0};
        CHECK(pthread_create(&t[i], NULL, worker_main, &w[i]) == 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        CHECK(w[i].ok);
    }
}

/* Runs this program again in a child as `test_api MODE URI` (a destination); its pid. */
static pid_t spawn_self(const char *mode, const char *uri_or_null) {
    char uri[128];
    snprintf(uri, sizeof uri, "%s", uri_or_null ? uri_or_null : "");
    pid_t child = fork();
    if (child == 0) {
        execl("/proc/self/exe", "test_api", mode, uri, (char *)NULL);
        _exit(127);
    }
    return child;
}

/* Region post-copy: a region of this process moves to a child process (this program again,
 * run as "migrate-dest URI"), which checks every page; a region no one takes thaws here. */
#define MIG_ADDR ((void *)0x510000000000ull) /* clear of AddressSanitizer's heap (0x6000...) */
#define MIG_PAGES 256
static uint64_t mig_word(size_t page) { return page % 3 ? mix(page) : 0; } /* a third never touched */

static void *mig_map(void) {
    void *p = mmap(MIG_ADDR, MIG_PAGES * 4096, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    CHECK(p == MIG_ADDR);
    if (p != MIG_ADDR) {
        fprintf(stderr, "cannot map the region to migrate\n");
        exit(1);
    }
    for (size_t i = 0; i < MIG_PAGES; i++)
        if (mig_word(i)) ((uint64_t *)p)[i * 512] = mig_word(i);
    return p;
}

static int migrate_dest(const char *uri) {
    EXPECT(mosaic_init(KEY), MOSAIC_OK);
    mosaic_migration_in *in = NULL;
    void *addr = NULL;
    uint64_t len = 0;
    EXPECT(mosaic_migrate_connect(uri, &in, &addr, &len), MOSAIC_OK);
    CHECK(addr == MIG_ADDR && len == MIG_PAGES * 4096);
    if (addr == MIG_ADDR)
        for (size_t i = 0; i < MIG_PAGES; i++) CHECK(((uint64_t *)addr)[i * 512] == mig_word(i));
    EXPECT(mosaic_migrate_complete(in, 60000), MOSAIC_OK);
    EXPECT(mosaic_migrate_complete(in, 60000), MOSAIC_ERR_BAD_HANDLE);
    if (addr == MIG_ADDR) {
        ((uint64_t *)addr)[5] = 7; /* ordinary memory now */
        CHECK(((uint64_t *)addr)[5] == 7 && ((uint64_t *)addr)[512] == mig_word(1));
        munmap(addr, MIG_PAGES * 4096);
    }
    EXPECT(mosaic_finalize(), MOSAIC_OK);
    return failures ? 1 : 0;
}

static void migration(void) {
    mosaic_migration_out *m = NULL;
    EXPECT(mosaic_migrate_freeze(NULL, 4096, "tcp://127.0.0.1:0", &m), MOSAIC_ERR_NULL);
    EXPECT(mosaic_migrate_freeze(MIG_ADDR, 100, "tcp://127.0.0.1:0", &m), MOSAIC_ERR_INVALID);
    CHECK(m == NULL);
    EXPECT(mosaic_migrate_finish(NULL, 0, NULL), MOSAIC_ERR_NULL);
    CHECK(mosaic_migrate_uri(NULL) == NULL);
    mosaic_migration_in *in = NULL;
    CHECK(mosaic_migrate_connect("tcp://127.0.0.1:1", &in, NULL, NULL) != MOSAIC_OK && in == NULL);

    /* Nobody takes it: it thaws, whole and writable. */
    uint64_t *p = mig_map();
    EXPECT(mosaic_migrate_freeze(p, MIG_PAGES * 4096, "tcp://127.0.0.1:0", &m), MOSAIC_OK);
    EXPECT(mosaic_migrate_finish(m, 50, NULL), MOSAIC_ERR_UNREACHABLE); /* timed out */
    EXPECT(mosaic_migrate_thaw(m), MOSAIC_OK);
    EXPECT(mosaic_migrate_thaw(m), MOSAIC_ERR_BAD_HANDLE);
    for (size_t i = 0; i < MIG_PAGES; i++) CHECK(p[i * 512] == mig_word(i));
    p[1] = 9;
    CHECK(p[1] == 9);
    munmap(p, MIG_PAGES * 4096);

    /* It moves to a child process. */
    p = mig_map();
    EXPECT(mosaic_migrate_freeze(p, MIG_PAGES * 4096, "tcp://127.0.0.1:0", &m), MOSAIC_OK);
    pid_t child = spawn_self("migrate-dest", mosaic_migrate_uri(m));
    mosaic_migrate_stats st;
    EXPECT(mosaic_migrate_finish(m, 60000, &st), MOSAIC_OK);
    CHECK(st.present_pages == MIG_PAGES - (MIG_PAGES + 2) / 3 && st.pages_sent == st.present_pages);
    CHECK(st.bytes_sent >= st.pages_sent * 4096 && st.bytes_sent < st.pages_sent * 4200 + 4096);
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
/* A network-RAM region moves to a child process (this program again, run as "netram-dest
 * URI"): only its table crosses, its pages stay on the memory server; one no one takes thaws. */
#define NR_ADDR 0x520000000000ull
#define NR_SIZE (8u << 20)
static uint64_t nr_word(size_t page, uint64_t round) { return mix(page) ^ round; }

static int netram_dest(const char *uri) {
    EXPECT(mosaic_init(KEY), MOSAIC_OK);
    mosaic_netram *r = NULL;
    mosaic_netram_options o;
    EXPECT(mosaic_netram_options_init(&o), MOSAIC_OK);
    o.resident_budget = 1u << 20;
    o.fault_mode = MOSAIC_FAULT_PER_CPU; /* the region's settings here are this process's */
    EXPECT(mosaic_netram_take_over(uri, &o, &r), MOSAIC_OK);
    uint64_t *p = r ? mosaic_netram_ptr(r) : NULL;
    CHECK((uint64_t)(uintptr_t)p == NR_ADDR && mosaic_netram_size(r) == NR_SIZE);
    if (p) {
        for (size_t i = 0; i < NR_SIZE / 4096; i++) CHECK(p[i * 512] == nr_word(i, 2));
        for (size_t i = 0; i < NR_SIZE / 4096; i++) p[i * 512] = nr_word(i, 3);
        for (size_t i = 0; i < NR_SIZE / 4096; i++) CHECK(p[i * 512] == nr_word(i, 3));
    }
    EXPECT(mosaic_netram_destroy(r), MOSAIC_OK);
    EXPECT(mosaic_finalize(), MOSAIC_OK);
    return failures ? 1 : 0;
}

static void netram_migration(const char *server) {
    mosaic_netram_out *h = NULL;
    mosaic_netram *r = NULL;
    EXPECT(mosaic_netram_hand_over(NULL, "tcp://127.0.0.1:0", &h), MOSAIC_ERR_NULL);
    EXPECT(mosaic_netram_take_over("tcp://127.0.0.1:1", NULL, &r), MOSAIC_ERR_UNREACHABLE);
    CHECK(h == NULL && r == NULL && mosaic_netram_out_uri(NULL) == NULL);
    mosaic_netram_options o;
    EXPECT(mosaic_netram_options_init(&o), MOSAIC_OK);
    o.size = NR_SIZE;
    o.resident_budget = 1u << 20;
    o.servers = server;
    o.fixed_addr = NR_ADDR;
    EXPECT(mosaic_netram_create(&o, &r), MOSAIC_OK);
    uint64_t *p = r ? mosaic_netram_ptr(r) : NULL;
    CHECK((uint64_t)(uintptr_t)p == NR_ADDR);
    if (!p) return;
    for (size_t i = 0; i < NR_SIZE / 4096; i++) p[i * 512] = nr_word(i, 1);

    /* Nobody takes it: it comes back, whole, under a new handle. */
    EXPECT(mosaic_netram_hand_over(r, "tcp://127.0.0.1:0", &h), MOSAIC_OK);
    EXPECT(mosaic_netram_destroy(r), MOSAIC_ERR_BAD_HANDLE); /* the hand-over has it now */
    EXPECT(mosaic_netram_out_finish(h, 50, NULL), MOSAIC_ERR_UNREACHABLE); /* timed out */
    EXPECT(mosaic_netram_out_thaw(h, &r), MOSAIC_OK);
    mosaic_netram *again = NULL;
    EXPECT(mosaic_netram_out_thaw(h, &again), MOSAIC_ERR_BAD_HANDLE);
    CHECK(again == NULL && r != NULL && mosaic_netram_ptr(r) == p);
    for (size_t i = 0; i < NR_SIZE / 4096; i++) CHECK(p[i * 512] == nr_word(i, 1));
    for (size_t i = 0; i < NR_SIZE / 4096; i++) p[i * 512] = nr_word(i, 2);

    /* It moves to a child process. */
    EXPECT(mosaic_netram_hand_over(r, "tcp://127.0.0.1:0", &h), MOSAIC_OK);
    pid_t child = spawn_self("netram-dest", mosaic_netram_out_uri(h));
    mosaic_netram_hand_over_stats st;
    EXPECT(mosaic_netram_out_finish(h, 60000, &st), MOSAIC_OK);
    CHECK(st.remote_pages == NR_SIZE / 4096 && st.written_back_pages > 0);
    CHECK(st.bytes_sent > 0 && st.bytes_sent < 4096); /* the table, not 8 MiB of pages */
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "migrate-dest") == 0) return migrate_dest(argv[2]);
    if (argc == 3 && strcmp(argv[1], "netram-dest") == 0) return netram_dest(argv[2]);
    strings();
    before_init();
    EXPECT(mosaic_init(KEY), MOSAIC_OK);
    EXPECT(mosaic_init(KEY), MOSAIC_ERR_ALREADY_INITIALIZED);
    null_arguments();

    mosaic_memserver *s = NULL;
    EXPECT(mosaic_memserver_start("tcp://127.0.0.1:0", 0, &s), MOSAIC_ERR_INVALID); /* no capacity */
    EXPECT(mosaic_memserver_start("bogus://x", 1 << 20, &s), MOSAIC_ERR_OS);
    EXPECT(mosaic_memserver_start("tcp://127.0.0.1:0", 64 << 20, &s), MOSAIC_OK);
    const char *uri = mosaic_memserver_uri(s);
    CHECK(uri != NULL && strncmp(uri, "tcp://127.0.0.1:", 16) == 0);
    char server[128];
    snprintf(server, sizeof server, "%s", uri ? uri : "");

    bad_options(server);
    dsm_without_a_job();
    real_use(server, MOSAIC_FAULT_THREAD);
    real_use(server, MOSAIC_FAULT_PER_CPU);
    threads(server);
    migration();
    netram_migration(server);

    EXPECT(mosaic_finalize(), MOSAIC_ERR_BUSY); /* the server is live */
    EXPECT(mosaic_memserver_stop(s), MOSAIC_OK);
    EXPECT(mosaic_memserver_stop(s), MOSAIC_ERR_BAD_HANDLE);
    CHECK(mosaic_memserver_uri(s) == NULL);
    EXPECT(mosaic_finalize(), MOSAIC_OK);
    EXPECT(mosaic_finalize(), MOSAIC_ERR_NOT_INITIALIZED);

    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C API checks passed\n");
    return 0;
}
