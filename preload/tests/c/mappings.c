/* Mappings as the kernel treats anonymous memory, checked by an unmodified program: partial
 * munmap (head, tail, a hole in the middle), munmap then a new mapping (which must not land on
 * the kept part), madvise(MADV_DONTNEED) reading zeros, mremap growing and shrinking with the data
 * kept. Prints one line per check; the output is the same with and without Mosaic. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#define MIB (1024ul * 1024ul)

static unsigned char *map(size_t len) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        return NULL;
    }
    return p;
}

/* The byte fill() writes at offset `i` of a mapping filled with `seed`. */
static unsigned char byte_at(size_t i, unsigned seed) {
    return (unsigned char)((i / 512) * 31u + seed);
}

static void fill(unsigned char *p, size_t len, unsigned seed) {
    for (size_t i = 0; i < len; i += 512)
        p[i] = byte_at(i, seed);
}

/* 1 if every sampled byte of `base[from, from + len)` holds what fill(base, ..., seed) wrote. */
static int same(const unsigned char *base, size_t from, size_t len, unsigned seed) {
    for (size_t i = from; i < from + len; i += 512)
        if (base[i] != byte_at(i, seed))
            return 0;
    return 1;
}

static int zeros(const unsigned char *p, size_t len) {
    for (size_t i = 0; i < len; i += 512)
        if (p[i] != 0)
            return 0;
    return 1;
}

int main(void) {
    /* An allocator's over-allocate-and-trim: map 64 MiB, keep the middle 32 MiB. */
    unsigned char *p = map(64 * MIB);
    if (!p)
        return 1;
    fill(p, 64 * MIB, 1);
    unsigned char *mid = p + 16 * MIB;
    if (munmap(p, 16 * MIB) != 0 || munmap(p + 48 * MIB, 16 * MIB) != 0) {
        perror("munmap");
        return 1;
    }
    printf("trimmed both ends, middle intact: %d\n", same(p, 16 * MIB, 32 * MIB, 1));
    /* New mappings must not land on the kept middle. */
    unsigned char *q = map(16 * MIB);
    unsigned char *r = map(16 * MIB);
    if (!q || !r)
        return 1;
    fill(q, 16 * MIB, 7);
    fill(r, 16 * MIB, 9);
    int disjoint = (q + 16 * MIB <= mid || q >= mid + 32 * MIB) && (r + 16 * MIB <= mid || r >= mid + 32 * MIB);
    printf("new mappings outside the kept middle: %d\n", disjoint);
    printf("middle still intact after new mappings: %d\n", same(p, 16 * MIB, 32 * MIB, 1));
    /* A hole punched in the middle of the middle. */
    if (munmap(mid + 8 * MIB, 4 * MIB) != 0) {
        perror("munmap hole");
        return 1;
    }
    printf("around the hole intact: %d %d\n", same(p, 16 * MIB, 8 * MIB, 1), same(p, 28 * MIB, 20 * MIB, 1));
    /* MADV_DONTNEED on private anonymous memory: the pages read as zeros afterwards. */
    if (madvise(q + 4 * MIB, 4 * MIB, MADV_DONTNEED) != 0) {
        perror("madvise");
        return 1;
    }
    printf("after MADV_DONTNEED: zeros %d, before %d, after %d\n", zeros(q + 4 * MIB, 4 * MIB), same(q, 0, 4 * MIB, 7),
           same(q, 8 * MIB, 8 * MIB, 7));
    /* mremap: grow (moving if it must), then shrink; the data stays. */
    unsigned char *g = mremap(r, 16 * MIB, 48 * MIB, MREMAP_MAYMOVE);
    if (g == MAP_FAILED) {
        perror("mremap grow");
        return 1;
    }
    printf("grown: old data %d, new part zeros %d\n", same(g, 0, 16 * MIB, 9), zeros(g + 16 * MIB, 32 * MIB));
    fill(g + 16 * MIB, 32 * MIB, 3);
    unsigned char *s = mremap(g, 48 * MIB, 8 * MIB, 0);
    printf("shrunk in place: %d, data %d\n", s == g, same(s, 0, 8 * MIB, 9));
    if (munmap(s, 8 * MIB) != 0 || munmap(q, 16 * MIB) != 0 || munmap(mid, 8 * MIB) != 0 ||
        munmap(mid + 12 * MIB, 20 * MIB) != 0) {
        perror("munmap rest");
        return 1;
    }
    printf("done\n");
    return 0;
}
