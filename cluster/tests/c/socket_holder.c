/* An ordinary program holding a UDP socket (which cannot migrate yet) while it counts. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int steps = argc > 1 ? atoi(argv[1]) : 50;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) {
        perror("socket");
        return 1;
    }
    unsigned long x = 1;
    for (int i = 0; i < steps; i++) {
        x = x * 6364136223846793005UL + 1442695040888963407UL;
        printf("step %d %lu\n", i, x);
        fflush(stdout);
        struct timespec t = {0, 20000000L};
        nanosleep(&t, NULL);
    }
    close(s);
    printf("done\n");
    return 0;
}
