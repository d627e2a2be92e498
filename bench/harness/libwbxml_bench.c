/* libwbxml baseline for bench/bench_codec.py: times wbxml_tree_from_wbxml (decode, tree
 * destroyed each time) and wbxml_tree_to_wbxml (encode, WBXML 1.3, with and without the
 * string table, output freed each time) on one WBXML file.
 *
 *   libwbxml_bench FILE [MIN_TIME_S [REPEATS]]
 *
 * Like bench.common.rate(): calibrates a batch of about MIN_TIME_S seconds, runs REPEATS
 * batches and prints the median calls per second of each operation as one JSON line.
 * Debian's libwbxml2-dev does not install wbxml_tree.h, so the three tree functions are
 * declared here with the signatures of libwbxml 0.11 (src/wbxml_tree.h).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <wbxml/wbxml.h>

typedef struct WBXMLTree_s WBXMLTree;
WBXMLError wbxml_tree_from_wbxml(WB_UTINY *wbxml, WB_ULONG wbxml_len, WBXMLLanguage lang,
                                 WBXMLCharsetMIBEnum charset, WBXMLTree **tree);
WBXMLError wbxml_tree_to_wbxml(WBXMLTree *tree, WB_UTINY **wbxml, WB_ULONG *wbxml_len,
                               WBXMLGenWBXMLParams *params);
void wbxml_tree_destroy(WBXMLTree *tree);
void wbxml_free(void *memblock);

static WB_UTINY *doc;
static WB_ULONG doc_len;
static WBXMLTree *enc_tree;
static WBXMLGenWBXMLParams params;
static WB_ULONG last_len;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what, WBXMLError err) {
    fprintf(stderr, "%s: %s\n", what, wbxml_errors_string(err));
    exit(1);
}

static void op_decode(void) {
    WBXMLTree *tree = NULL;
    WBXMLError err = wbxml_tree_from_wbxml(doc, doc_len, WBXML_LANG_UNKNOWN, WBXML_CHARSET_UNKNOWN, &tree);
    if (err != WBXML_OK) die("wbxml_tree_from_wbxml", err);
    wbxml_tree_destroy(tree);
}

static void op_encode(void) {
    WB_UTINY *out = NULL;
    WB_ULONG len = 0;
    WBXMLError err = wbxml_tree_to_wbxml(enc_tree, &out, &len, &params);
    if (err != WBXML_OK) die("wbxml_tree_to_wbxml", err);
    last_len = len;
    wbxml_free(out);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double rate(void (*fn)(void), double min_time, int repeats) {
    long n = 1, i;
    double dt, t0, samples[64];
    int r;
    for (;;) {
        t0 = now();
        for (i = 0; i < n; i++) fn();
        dt = now() - t0;
        if (dt >= min_time / 4) break;
        n *= 4;
    }
    n = (long)(n * (min_time / (dt > 1e-9 ? dt : 1e-9)));
    if (n < 1) n = 1;
    if (repeats > 64) repeats = 64;
    for (r = 0; r < repeats; r++) {
        t0 = now();
        for (i = 0; i < n; i++) fn();
        samples[r] = n / (now() - t0);
    }
    qsort(samples, repeats, sizeof(double), cmp);
    return samples[repeats / 2];
}

int main(int argc, char **argv) {
    double min_time = argc > 2 ? atof(argv[2]) : 0.2;
    int repeats = argc > 3 ? atoi(argv[3]) : 7;
    double dec, enc_str, enc_nostr;
    WB_ULONG len_str, len_nostr;
    FILE *f;
    long size;
    WBXMLError err;

    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE [MIN_TIME_S [REPEATS]]\n", argv[0]);
        return 2;
    }
    f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 1; }
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    doc = malloc(size);
    if (fread(doc, 1, size, f) != (size_t)size) { perror("read"); return 1; }
    fclose(f);
    doc_len = (WB_ULONG)size;

    err = wbxml_tree_from_wbxml(doc, doc_len, WBXML_LANG_UNKNOWN, WBXML_CHARSET_UNKNOWN, &enc_tree);
    if (err != WBXML_OK) die("wbxml_tree_from_wbxml", err);
    params.wbxml_version = WBXML_VERSION_13;
    params.keep_ignorable_ws = FALSE;
    params.produce_anonymous = FALSE;

    dec = rate(op_decode, min_time, repeats);
    params.use_strtbl = TRUE;
    enc_str = rate(op_encode, min_time, repeats);
    len_str = last_len;
    params.use_strtbl = FALSE;
    enc_nostr = rate(op_encode, min_time, repeats);
    len_nostr = last_len;
    printf("{\"bytes\": %lu, \"decode\": %.1f, \"encode_strtbl\": %.1f, \"encode_nostr\": %.1f, "
           "\"encoded_bytes_strtbl\": %lu, \"encoded_bytes_nostr\": %lu}\n",
           (unsigned long)doc_len, dec, enc_str, enc_nostr, (unsigned long)len_str, (unsigned long)len_nostr);
    wbxml_tree_destroy(enc_tree);
    free(doc);
    return 0;
}
