/* GPT-2's byte-level BPE (gpt2engine.tokenizer): the same ids as the `tokenizers` library, in a
 * small fraction of its memory (docs/tokenizer.md).
 *
 * Text (UTF-8) is cut into pieces by GPT-2's regex, written out by hand below:
 *     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * with the character classes of unicode_classes.h. Each piece's bytes start as one symbol each
 * (the vocabulary's id of that byte) and the adjacent pair of lowest merge rank is merged, the
 * leftmost first, until no pair has a merge: a heap of candidate merges, as the `tokenizers`
 * library does it, so a hostile megabyte-long piece costs n log n, not n^2.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { O, L, N, S };  /* other, letter, number, white space: scripts/unicode_classes.py's order */
#include "unicode_classes.h"

/* A merge in 8 bytes: left id << 42 | right id << 20 | rank (ids below 2^22, ranks below 2^20 - 1,
 * so no merge is EMPTY); its merged id is merged[rank]. */
#define ID_BITS 22
#define RANK_BITS 20
#define EMPTY UINT64_MAX

typedef struct {
    int32_t byte_id[256];  /* the id of each byte's one-byte token, -1 if the vocabulary lacks it */
    uint64_t mask;         /* table size - 1 */
    uint64_t *table;       /* open addressing, linear probing, at most half full */
    int32_t *merged;       /* by rank */
} Bpe;

typedef struct {
    int32_t id, prev, next, len;  /* len 0: merged into its left neighbour */
} Symbol;

typedef struct {
    int32_t rank, pos, merged;
} Candidate;

static uint64_t pair_key(int32_t left, int32_t right) {  /* a merge's upper 44 bits */
    return (uint64_t)left << (ID_BITS + RANK_BITS) | (uint64_t)right << RANK_BITS;
}

static uint64_t slot_of(uint64_t key, uint64_t mask) {
    key ^= key >> 33;
    key *= 0xFF51AFD7ED558CCDull;
    key ^= key >> 33;
    return key & mask;
}

/* The rank of the merge of (left, right), -1 if there is none. */
static int32_t rank_of(const Bpe *bpe, int32_t left, int32_t right) {
    uint64_t key = pair_key(left, right), rank_mask = (1u << RANK_BITS) - 1;
    for (uint64_t i = slot_of(key, bpe->mask);; i = (i + 1) & bpe->mask) {
        if (bpe->table[i] == EMPTY) return -1;
        if ((bpe->table[i] & ~rank_mask) == key) return (int32_t)(bpe->table[i] & rank_mask);
    }
}

void gpt2engine_bpe_free(Bpe *bpe) {
    if (bpe) free(bpe->table), free(bpe->merged);
    free(bpe);
}

/* merges i = (left[i], right[i]) -> merged[i], rank i (ids below 2^22, fewer than 2^20 - 1 merges);
 * a pair listed twice keeps its last entry, as in `tokenizers`. NULL if memory is short. */
Bpe *gpt2engine_bpe_new(const int32_t *byte_id, int count, const int32_t *left, const int32_t *right,
                        const int32_t *merged) {
    Bpe *bpe = calloc(1, sizeof *bpe);
    uint64_t size = 16;
    while (size < 2 * (uint64_t)count) size *= 2;
    if (!bpe || !(bpe->table = malloc(size * sizeof *bpe->table)) ||
        !(bpe->merged = malloc((count + 1) * sizeof *bpe->merged))) {
        gpt2engine_bpe_free(bpe);
        return NULL;
    }
    memcpy(bpe->byte_id, byte_id, sizeof bpe->byte_id);
    memcpy(bpe->merged, merged, count * sizeof *merged);
    bpe->mask = size - 1;
    for (uint64_t i = 0; i < size; i++) bpe->table[i] = EMPTY;
    for (int r = 0; r < count; r++) {
        uint64_t key = pair_key(left[r], right[r]), i = slot_of(key, bpe->mask);
        while (bpe->table[i] != EMPTY && bpe->table[i] >> RANK_BITS != key >> RANK_BITS) i = (i + 1) & bpe->mask;
        bpe->table[i] = key | (uint64_t)r;
    }
    return bpe;
}

/* The code point at s[i] and its length in bytes. The text comes from Python's str.encode, so it
 * is valid UTF-8; a byte that does not fit is taken as one character of class O all the same. */
static uint32_t code_point(const uint8_t *s, long n, long i, int *len) {
    uint32_t c = s[i];
    int extra = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : c >= 0xC0 ? 1 : 0;
    if (c < 0x80 || extra == 0 || i + extra >= n) {
        *len = 1;
        return c < 0x80 ? c : 0xFFFD;
    }
    c &= 0x3F >> extra;
    for (int k = 1; k <= extra; k++) c = c << 6 | (s[i + k] & 0x3F);
    *len = extra + 1;
    return c;
}

static int class_of(uint32_t c) {
    int lo = 0, hi = (int)(sizeof CLASS_RANGES / sizeof *CLASS_RANGES) - 1;
    while (lo <= hi) {  /* the last run that starts at or before c */
        int mid = (lo + hi) / 2;
        if (CLASS_RANGES[mid].first <= c) lo = mid + 1;
        else hi = mid - 1;
    }
    return hi >= 0 && c <= CLASS_RANGES[hi].last ? CLASS_RANGES[hi].cls : O;
}

static int class_at(const uint8_t *s, long n, long i, int *len) {
    return class_of(code_point(s, n, i, len));
}

/* Where the piece that starts at s[i] ends: the regex's first alternative that matches there. */
static long piece_end(const uint8_t *s, long n, long i) {
    if (s[i] == '\'' && i + 1 < n) {  /* 's 't 're 've 'm 'll 'd */
        uint8_t a = s[i + 1], b = i + 2 < n ? s[i + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
    int len, cls = class_at(s, n, i, &len);
    long j = i + len;
    if (s[i] == ' ' && j < n) {  /* " ?" before a run that is not white space */
        int next = class_at(s, n, j, &len);
        if (next != S) cls = next, j += len;
    }
    if (cls != S) {  /* \p{L}+, \p{N}+ or [^\s\p{L}\p{N}]+ */
        while (j < n && class_at(s, n, j, &len) == cls) j += len;
        return j;
    }
    long last = i;  /* white space: where its last character starts */
    while (j < n && class_at(s, n, j, &len) == S) last = j, j += len;
    if (j == n) return j;          /* \s+ at the end of the text */
    if (last > i) return last;     /* \s+(?!\S): all but the space before the next word */
    return j;                      /* \s+: a lone space before it */
}

static int before(Candidate a, Candidate b) {
    return a.rank != b.rank ? a.rank < b.rank : a.pos < b.pos;
}

static void push(Candidate *heap, long *size, Candidate c) {
    long i = (*size)++;
    for (; i > 0 && before(c, heap[(i - 1) / 2]); i = (i - 1) / 2) heap[i] = heap[(i - 1) / 2];
    heap[i] = c;
}

static Candidate pop(Candidate *heap, long *size) {
    Candidate top = heap[0], last = heap[--*size];
    long i = 0;
    for (;;) {
        long child = 2 * i + 1;
        if (child >= *size) break;
        if (child + 1 < *size && before(heap[child + 1], heap[child])) child++;
        if (!before(heap[child], last)) break;
        heap[i] = heap[child];
        i = child;
    }
    heap[i] = last;
    return top;
}

static void push_pair(const Bpe *bpe, const Symbol *sym, int32_t pos, Candidate *heap, long *size) {
    int32_t rank = rank_of(bpe, sym[pos].id, sym[sym[pos].next].id);
    if (rank >= 0) push(heap, size, (Candidate){rank, pos, bpe->merged[rank]});
}

/* One piece's tokens into out; returns how many. sym and heap have room for m and 3m. */
static long encode_piece(const Bpe *bpe, const uint8_t *p, long m, Symbol *sym, Candidate *heap,
                         int32_t *out) {
    int32_t count = 0;
    for (long i = 0; i < m; i++) {  /* a byte the vocabulary lacks is dropped, as in `tokenizers` */
        if (bpe->byte_id[p[i]] < 0) continue;
        sym[count] = (Symbol){bpe->byte_id[p[i]], count - 1, count + 1, 1};
        count++;
    }
    if (count == 0) return 0;
    sym[count - 1].next = -1;
    long size = 0;
    for (int32_t i = 0; i + 1 < count; i++) push_pair(bpe, sym, i, heap, &size);
    while (size > 0) {
        Candidate top = pop(heap, &size);
        Symbol *left = &sym[top.pos];
        if (left->len == 0 || left->next < 0) continue;  /* merged away meanwhile */
        int32_t rank = rank_of(bpe, left->id, sym[left->next].id);
        if (rank < 0 || bpe->merged[rank] != top.merged) continue;  /* its pair has changed */
        Symbol *right = &sym[left->next];
        left->id = top.merged;
        left->len += right->len;
        left->next = right->next;
        right->len = 0;
        if (left->next >= 0) sym[left->next].prev = top.pos;
        if (left->prev >= 0) push_pair(bpe, sym, left->prev, heap, &size);
        if (left->next >= 0) push_pair(bpe, sym, top.pos, heap, &size);
    }
    long n = 0;
    for (int32_t i = 0; i >= 0; i = sym[i].next) out[n++] = sym[i].id;
    return n;
}

/* The ids of text[0:n] into out (room for n: every token holds a byte at least); returns how
 * many, or -1 if memory is short. Reads only `bpe`: any number of threads may call it at once. */
long gpt2engine_bpe_encode(const Bpe *bpe, const uint8_t *text, long n, int32_t *out) {
    long count = 0, room = 0;
    Symbol *sym = NULL;
    Candidate *heap = NULL;
    for (long i = 0, end; i < n; i = end) {
        end = piece_end(text, n, i);
        if (end - i > room) {  /* room for the longest piece so far */
            room = 2 * (end - i);
            free(sym);
            free(heap);
            sym = malloc(room * sizeof *sym);
            heap = malloc(3 * room * sizeof *heap);
            if (!sym || !heap) {
                count = -1;
                break;
            }
        }
        count += encode_piece(bpe, text + i, end - i, sym, heap, out + count);
    }
    free(sym);
    free(heap);
    return count;
}
