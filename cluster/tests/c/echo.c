/* An ordinary program reading standard input: prints each line it reads, numbered. */
#include <stdio.h>
#include <string.h>

int main(void) {
    char line[256];
    int n = 0;
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        printf("got %d: %s\n", ++n, line);
        fflush(stdout);
    }
    printf("end after %d lines\n", n);
    return 0;
}
