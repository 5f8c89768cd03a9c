/*
 * A 1-D heat stencil over an array four times larger than the local RAM it may use, on Mosaic
 * network RAM through the C API. Uses the servers in MOSAIC_SERVERS (and the key in
 * MOSAIC_CLUSTER_KEY / _FILE); without them it starts a memory server in this process.
 *   cc stencil.c $(pkg-config --cflags --libs mosaic) -o stencil && ./stencil [MiB]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "mosaic.h"

static int fail(const char *what) {
    fprintf(stderr, "stencil: %s: %s\n", what, mosaic_last_error());
    return 1;
}

int main(int argc, char **argv) {
    uint64_t mib = argc > 1 ? (uint64_t)atoll(argv[1]) : 64;
    int own_server = getenv("MOSAIC_SERVERS") == NULL;
    if (mosaic_init(own_server ? "example-cluster-key-0123456789" : NULL) != MOSAIC_OK) return fail("init");
    mosaic_memserver *server = NULL;
    mosaic_netram_options o;
    mosaic_netram_options_init(&o);
    if (own_server) {
        if (mosaic_memserver_start("tcp://127.0.0.1:0", 4 * mib << 20, &server) != MOSAIC_OK)
            return fail("memserver");
        o.servers = mosaic_memserver_uri(server);
    }
    o.size = mib << 20;
    o.resident_budget = (mib << 20) / 4;
    mosaic_netram *r;
    if (mosaic_netram_create(&o, &r) != MOSAIC_OK) return fail("netram");
    double *u = mosaic_netram_ptr(r);
    size_t n = mosaic_netram_size(r) / sizeof(double) / 2; /* two buffers */
    double *v = u + n;
    for (size_t i = 0; i < n; i++) u[i] = (i == n / 2) ? 1e6 : 0.0;
    for (int step = 0; step < 4; step++) {
        for (size_t i = 1; i + 1 < n; i++) v[i] = u[i] + 0.25 * (u[i - 1] - 2 * u[i] + u[i + 1]);
        v[0] = u[0];
        v[n - 1] = u[n - 1];
        double *t = u; u = v; v = t;
    }
    double total = 0;
    for (size_t i = 0; i < n; i++) total += u[i];
    mosaic_netram_stats st;
    mosaic_netram_get_stats(r, &st);
    printf("heat %.1f (conserved: %s) over %zu cells; %llu pages fetched, %llu prefetched, %llu written back\n",
           total, total > 999999.0 && total < 1000001.0 ? "yes" : "NO", n, (unsigned long long)st.fetched,
           (unsigned long long)st.prefetched, (unsigned long long)st.written_back);
    mosaic_netram_destroy(r);
    if (server) mosaic_memserver_stop(server);
    mosaic_finalize();
    return total > 999999.0 && total < 1000001.0 ? 0 : 1;
}
