/*
 * The Jacobi stencil of mosaic_examples::jacobi written with MPI halo exchange, the peer its DSM
 * version is measured against: an N x N grid of doubles (top edge 1.0, other edges 0.0), rows in
 * bands, each iteration exchanging the band's edge rows with the neighbours (MPI_Sendrecv) and
 * computing the band. Prints the same checksum as dsm-jacobi (sum and FNV-1a of the bits of the
 * final grid in row-major order, gathered on rank 0) and the time per iteration.
 *   mpicc -O2 -o jacobi_mpi benches/mpi/jacobi_mpi.c && mpirun -n 2 ./jacobi_mpi 512 100
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int n = argc > 1 ? atoi(argv[1]) : 512, iters = argc > 2 ? atoi(argv[2]) : 100;
    int rows = n - 2, lo = 1 + rank * rows / size, hi = 1 + (rank + 1) * rows / size; /* [lo, hi) */
    int local = hi - lo;
    /* Local bands with one halo row above and below: global row lo-1 .. hi. */
    double *a = calloc((size_t)(local + 2) * n, sizeof *a), *b = calloc((size_t)(local + 2) * n, sizeof *b);
    if (!a || !b) return 1;
    if (lo == 1)
        for (int j = 0; j < n; j++) a[j] = b[j] = 1.0; /* global row 0 is the top edge */
    int up = rank > 0 ? rank - 1 : MPI_PROC_NULL, down = rank < size - 1 ? rank + 1 : MPI_PROC_NULL;
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    for (int it = 0; it < iters; it++) {
        double *old = it % 2 == 0 ? a : b, *new = it % 2 == 0 ? b : a;
        MPI_Sendrecv(old + (size_t)1 * n, n, MPI_DOUBLE, up, 0, old + (size_t)(local + 1) * n, n, MPI_DOUBLE, down, 0,
                     MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        MPI_Sendrecv(old + (size_t)local * n, n, MPI_DOUBLE, down, 1, old, n, MPI_DOUBLE, up, 1, MPI_COMM_WORLD,
                     MPI_STATUS_IGNORE);
        for (int i = 1; i <= local; i++)
            for (int j = 1; j < n - 1; j++)
                new[(size_t)i * n + j] = 0.25 * (old[(size_t)(i - 1) * n + j] + old[(size_t)(i + 1) * n + j] +
                                                 old[(size_t)i * n + j - 1] + old[(size_t)i * n + j + 1]);
    }
    double t = MPI_Wtime() - t0;
    double *last = iters % 2 == 0 ? a : b;
    /* Gather the final grid on rank 0, in row-major order. */
    double *grid = rank == 0 ? calloc((size_t)n * n, sizeof *grid) : NULL;
    int *counts = malloc(size * sizeof *counts), *displs = malloc(size * sizeof *displs);
    for (int r = 0; r < size; r++) {
        int l = 1 + r * rows / size, h = 1 + (r + 1) * rows / size;
        counts[r] = (h - l) * n;
        displs[r] = l * n;
    }
    MPI_Gatherv(last + n, local * n, MPI_DOUBLE, grid, counts, displs, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        for (int j = 0; j < n; j++) grid[j] = 1.0; /* the edges nobody computes */
        double sum = 0;
        uint64_t bits = 0xcbf29ce484222325ull;
        for (size_t i = 0; i < (size_t)n * n; i++) {
            uint64_t v;
            memcpy(&v, &grid[i], 8);
            sum += grid[i];
            bits = (bits ^ v) * 0x100000001b3ull;
        }
        printf("jacobi_mpi: %dx%d, %d iterations on %d processes: checksum %.12e %016llx\n", n, n, iters, size, sum,
               (unsigned long long)bits);
        printf("jacobi_mpi: %.1f us per iteration\n", t * 1e6 / iters);
    }
    MPI_Finalize();
    return 0;
}
