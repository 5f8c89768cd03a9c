/* Takes MIB mebibytes of memory (written, so resident), prints "held", and keeps it until
 * killed (ten minutes at most). Squeezes a node's memory in the ushering test. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    size_t bytes = (argc > 1 ? strtoull(argv[1], NULL, 10) : 64) << 20;
    /* Volatile: written for real, not optimised away as a store nobody reads. */
    volatile char *p = malloc(bytes);
    if (!p) {
        perror("malloc");
        return 1;
    }
    for (size_t i = 0; i < bytes; i += 4096) p[i] = 1;
    printf("held\n");
    fflush(stdout);
    for (int i = 0; i < 600; i++) sleep(1);
    return 0;
}
