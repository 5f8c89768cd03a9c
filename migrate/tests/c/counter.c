/* An ordinary program for the migration tests (nothing of Mosaic in it): fills a heap buffer,
 * then for STEPS steps changes every page of it and prints a checksum, sleeping MS milliseconds
 * between steps. The output depends only on the arguments, so a run that migrated prints
 * exactly what a run that did not prints. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int steps = argc > 1 ? atoi(argv[1]) : 40;
    size_t mib = argc > 2 ? (size_t)atoi(argv[2]) : 16;
    int ms = argc > 3 ? atoi(argv[3]) : 20;
    size_t n = mib << 20;
    unsigned char *buf = malloc(n);
    if (!buf) {
        perror("malloc");
        return 1;
    }
    for (size_t i = 0; i < n; i++)
        buf[i] = (unsigned char)(i * 7 + 3);
    /* A static and a stack array: the data segment and the stack move too. */
    static unsigned long history[1024];
    unsigned long local[64];
    memset(local, 0, sizeof local);
    for (int s = 0; s < steps; s++) {
        unsigned long sum = 0;
        for (size_t i = ((size_t)s * 64) % 4096; i < n; i += 4096)
            buf[i] = (unsigned char)(buf[i] + s);
        for (size_t i = 0; i < n; i += 64)
            sum = sum * 31 + buf[i];
        history[s % 1024] = sum;
        local[s % 64] ^= sum;
        printf("step %d sum %lu\n", s, sum);
        fflush(stdout);
        struct timespec t = {0, (long)ms * 1000000L};
        nanosleep(&t, NULL);
    }
    unsigned long all = 0;
    for (int i = 0; i < 1024; i++)
        all += history[i];
    for (int i = 0; i < 64; i++)
        all ^= local[i];
    printf("done %lu\n", all);
    return 0;
}
