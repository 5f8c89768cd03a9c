/*
 * The MPI figures `mosaic-bench dsm` puts beside DSM's, measured in the same run: one-sided
 * operations on a window (Open MPI from Debian), rank 0 timing, the others serving.
 *   read_miss:     MPI_Get of 4 KiB from rank 1's window, completed by MPI_Win_flush, inside a
 *                  passive epoch (MPI_Win_lock_all) opened beforehand; a fresh 4 KiB each sample.
 *   lock:          MPI_Win_lock(EXCLUSIVE) on rank 1, an 8-byte MPI_Get (Open MPI may defer taking
 *                  the lock until the first operation), MPI_Win_unlock; nobody else asking.
 *   lock_handoff:  ranks 0 and 1 both doing the same on rank 1 over and over; rank 0's lock + get.
 *   barrier:       MPI_Barrier of all ranks.
 * Prints one JSON line per figure, as mosaic-bench does: bench "dsm", transport "mpi".
 *   mpicc -O2 -o dsm_mpi benches/mpi/dsm_mpi.c && mpirun -n 2 ./dsm_mpi [SAMPLES]
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PAGE 4096

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Prints the figure of `n` samples (seconds) as a JSON line (rank 0 only). */
static void emit(const char *op, int nodes, double *s, int n) {
    qsort(s, (size_t)n, sizeof *s, cmp);
    int p99 = (int)((double)(n - 1) * 0.99 + 0.5);
    printf("{\"bench\":\"dsm\",\"op\":\"%s\",\"nodes\":%d,\"transport\":\"mpi\",\"min_us\":%.3f,\"median_us\":%.3f,"
           "\"p99_us\":%.3f,\"samples\":%d}\n",
           op, nodes, s[0] * 1e6, s[n / 2] * 1e6, s[p99] * 1e6, n);
    fflush(stdout);
}

/* Takes the exclusive lock on rank 1's window `n` times, with an 8-byte get inside (so that the
 * lock is really taken), timing into s[i] either the whole acquire + release or, with
 * `acquire_only`, the acquire up to the completed get. */
static void time_locks(MPI_Win win, char *buf, double *s, int n, int acquire_only) {
    for (int i = 0; i < n; i++) {
        double t = MPI_Wtime();
        MPI_Win_lock(MPI_LOCK_EXCLUSIVE, 1, 0, win);
        MPI_Get(buf, 8, MPI_BYTE, 1, 0, 8, MPI_BYTE, win);
        if (acquire_only) {
            MPI_Win_flush(1, win);
            s[i] = MPI_Wtime() - t;
            MPI_Win_unlock(1, win);
        } else {
            MPI_Win_unlock(1, win);
            s[i] = MPI_Wtime() - t;
        }
    }
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int n = argc > 1 ? atoi(argv[1]) : 500;
    if (size < 2 || n < 1) {
        if (rank == 0) fprintf(stderr, "dsm_mpi: needs 2 ranks or more and SAMPLES > 0\n");
        MPI_Finalize();
        return 2;
    }
    char *base;
    MPI_Win win;
    MPI_Win_allocate((MPI_Aint)n * PAGE, 1, MPI_INFO_NULL, MPI_COMM_WORLD, &base, &win);
    memset(base, rank + 1, (size_t)n * PAGE);
    char *buf = malloc((size_t)PAGE);
    double *s = malloc(sizeof(double) * (size_t)n);
    if (!buf || !s) MPI_Abort(MPI_COMM_WORLD, 1);
    MPI_Barrier(MPI_COMM_WORLD);

    /* Read misses: 4 KiB gets from rank 1, each completed before the next. */
    MPI_Win_lock_all(0, win);
    if (rank == 0) {
        for (int i = 0; i < n; i++) {
            double t = MPI_Wtime();
            MPI_Get(buf, PAGE, MPI_BYTE, 1, (MPI_Aint)i * PAGE, PAGE, MPI_BYTE, win);
            MPI_Win_flush(1, win);
            s[i] = MPI_Wtime() - t;
            if (buf[0] != 2) MPI_Abort(MPI_COMM_WORLD, 3); /* rank 1's bytes */
        }
        emit("read_miss", size, s, n);
    }
    MPI_Win_unlock_all(win);
    MPI_Barrier(MPI_COMM_WORLD);

    /* Lock acquire + release, uncontended. */
    if (rank == 0) {
        time_locks(win, buf, s, n, 0);
        emit("lock", size, s, n);
    }
    MPI_Barrier(MPI_COMM_WORLD);

    /* The lock handed between ranks 0 and 1. */
    if (rank <= 1) {
        time_locks(win, buf, s, n, 1);
        if (rank == 0) emit("lock_handoff", size, s, n);
    }
    MPI_Barrier(MPI_COMM_WORLD);

    /* Barriers. */
    for (int i = 0; i < n; i++) {
        double t = MPI_Wtime();
        MPI_Barrier(MPI_COMM_WORLD);
        s[i] = MPI_Wtime() - t;
    }
    if (rank == 0) emit("barrier", size, s, n);

    free(buf);
    free(s);
    MPI_Win_free(&win);
    MPI_Finalize();
    return 0;
}
