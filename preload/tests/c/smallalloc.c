/*
 * An ordinary program made of small allocations, as an interpreter's objects or a database's
 * index are: a hash table of N entries, each a malloc'd node and a string value of 24-200 bytes
 * (malloc, calloc, strdup, aligned_alloc), chained in buckets and in a list in insertion order.
 * It grows every third value (realloc), walks the list twice, looks up N/100 random keys through
 * the table, frees everything and prints a checksum.
 * Peak RSS goes to standard error. Under mosrun with a smaller budget, its output must not
 * change and its peak RSS must stay near the budget.
 *   smallalloc [ENTRIES]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

struct node {
    struct node *next, *older;
    uint64_t key;
    char *value;
    size_t len;
};

static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static char *make_value(uint64_t key, size_t *len, int how) {
    char buf[256];
    size_t n = 24 + mix(key) % 150;
    for (size_t i = 0; i < n; i++) buf[i] = (char)('a' + (mix(key + i) % 26));
    buf[n] = 0;
    *len = n;
    char *v;
    switch (how % 4) {
    case 0: v = malloc(n + 1); break;
    case 1: v = calloc(1, n + 1); break;
    case 2: v = aligned_alloc(16, (n + 16) & ~(size_t)15); break;
    default: return strdup(buf);
    }
    if (v) memcpy(v, buf, n + 1);
    return v;
}

int main(int argc, char **argv) {
    size_t entries = argc > 1 ? (size_t)atol(argv[1]) : 1000000;
    size_t buckets = entries / 4 + 1;
    struct node **table = calloc(buckets, sizeof *table);
    struct node *newest = NULL;
    if (!table) return 2;
    for (uint64_t k = 0; k < entries; k++) {
        struct node *n = malloc(sizeof *n);
        if (!n) { fprintf(stderr, "node %llu failed\n", (unsigned long long)k); return 2; }
        n->key = k;
        n->value = make_value(k, &n->len, (int)k);
        if (!n->value) { fprintf(stderr, "value %llu failed\n", (unsigned long long)k); return 2; }
        size_t b = mix(k) % buckets;
        n->next = table[b];
        table[b] = n;
        n->older = newest;
        newest = n;
    }
    /* Every third value grows: freed memory must be reused, not leaked. */
    for (struct node *n = newest; n; n = n->older)
            if (n->key % 3 == 0) {
                char *bigger = realloc(n->value, n->len + 9);
                if (!bigger) return 2;
                memcpy(bigger + n->len, "-updated", 9);
                n->value = bigger;
                n->len += 8;
            }
    uint64_t sum = 0, count = 0;
    for (int pass = 0; pass < 2; pass++)
        for (struct node *n = newest; n; n = n->older) {
            for (size_t i = 0; i < n->len; i++) sum = sum * 31 + (unsigned char)n->value[i];
            sum ^= mix(n->key);
            count++;
        }
    for (uint64_t i = 0; i < entries / 100; i++) {
        uint64_t k = mix(i + 12345) % entries;
        struct node *n = table[mix(k) % buckets];
        while (n && n->key != k) n = n->next;
        if (!n) { fprintf(stderr, "key %llu lost\n", (unsigned long long)k); return 3; }
        sum = sum * 31 + (unsigned char)n->value[n->len / 2];
    }
    for (struct node *n = newest, *older; n; n = older) {
        older = n->older;
        free(n->value);
        free(n);
    }
    free(table);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("entries %zu walked %llu checksum %016llx\n", entries, (unsigned long long)count, (unsigned long long)sum);
    fprintf(stderr, "maxrss_kib %ld\n", ru.ru_maxrss);
    return 0;
}
