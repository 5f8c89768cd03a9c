/* An ordinary multi-threaded program for the migration tests (nothing of Mosaic in it): the
 * main thread hands ITEMS items one at a time to WORKERS threads through a mutex and two
 * condition variables and prints each result in order, sleeping MS milliseconds between items.
 * Each worker has a buffer of its own on the heap. The output depends only on the arguments. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WORKERS 4
#define BUF (4 << 20)

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t have_work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t have_result = PTHREAD_COND_INITIALIZER;
static int released, taken, stopping;
static unsigned long *results;
static char *ready;

static void *worker(void *arg) {
    (void)arg;
    unsigned char *mine = malloc(BUF);
    if (!mine)
        abort();
    for (size_t i = 0; i < BUF; i++)
        mine[i] = (unsigned char)(i * 13 + 1);
    for (;;) {
        pthread_mutex_lock(&mu);
        while (taken >= released && !stopping)
            pthread_cond_wait(&have_work, &mu);
        if (taken >= released) {
            pthread_mutex_unlock(&mu);
            break;
        }
        int it = taken++;
        pthread_mutex_unlock(&mu);
        unsigned long r = (unsigned long)it;
        for (int k = 0; k < 100000; k++)
            r = r * 6364136223846793005UL + 1442695040888963407UL + mine[((size_t)k * 4096 + (size_t)it) % BUF];
        pthread_mutex_lock(&mu);
        results[it] = r;
        ready[it] = 1;
        pthread_cond_broadcast(&have_result);
        pthread_mutex_unlock(&mu);
    }
    free(mine);
    return NULL;
}

int main(int argc, char **argv) {
    int items = argc > 1 ? atoi(argv[1]) : 100;
    int ms = argc > 2 ? atoi(argv[2]) : 20;
    results = calloc((size_t)items, sizeof *results);
    ready = calloc((size_t)items, 1);
    pthread_t t[WORKERS];
    for (int i = 0; i < WORKERS; i++)
        pthread_create(&t[i], NULL, worker, NULL);
    for (int i = 0; i < items; i++) {
        pthread_mutex_lock(&mu);
        released = i + 1;
        pthread_cond_signal(&have_work);
        while (!ready[i])
            pthread_cond_wait(&have_result, &mu);
        unsigned long r = results[i];
        pthread_mutex_unlock(&mu);
        printf("item %d %lu\n", i, r);
        fflush(stdout);
        struct timespec ts = {0, (long)ms * 1000000L};
        nanosleep(&ts, NULL);
    }
    pthread_mutex_lock(&mu);
    stopping = 1;
    pthread_cond_broadcast(&have_work);
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < WORKERS; i++)
        pthread_join(t[i], NULL);
    printf("done\n");
    return 0;
}
