/*
 * km_apply TEMPLATE PLAN PACK OUTPUT
 *
 * Writes the task's .tflite to OUTPUT (through OUTPUT.part + rename, so a
 * reader never sees a half-written file). On any error prints the reason
 * to stderr, exits 1 and leaves no OUTPUT (nor OUTPUT.part) behind.
 * The library itself (km_apply.c) allocates nothing; this host tool reads
 * the files into heap buffers.
 */
#include "km_apply.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    long size;
    if (!f)
        return NULL;
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 ||
        fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return NULL;
    }
    buf = (unsigned char *)malloc(size ? (size_t)size : 1u);
    if (buf && fread(buf, 1, (size_t)size, f) != (size_t)size) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)size;
    return buf;
}

static int fail(const char *what, const char *path)
{
    fprintf(stderr, "km_apply: %s%s%s\n", what, path ? ": " : "",
            path ? path : "");
    return 1;
}

int main(int argc, char **argv)
{
    size_t tlen = 0, plen = 0, klen = 0, need;
    unsigned char *tmpl, *plan, *pack, *out;
    void *scratch;
    km_status st;
    char *part;
    FILE *f;
    int ok;

    if (argc != 5) {
        fprintf(stderr, "usage: km_apply TEMPLATE PLAN PACK OUTPUT\n");
        return 2;
    }
    tmpl = read_file(argv[1], &tlen);
    if (!tmpl)
        return fail("cannot read template", argv[1]);
    plan = read_file(argv[2], &plen);
    if (!plan)
        return fail("cannot read plan", argv[2]);
    pack = read_file(argv[3], &klen);
    if (!pack)
        return fail("cannot read pack", argv[3]);

    need = km_scratch_bytes(plan, plen, pack, klen);
    scratch = malloc(need ? need : 1u);
    out = (unsigned char *)malloc(tlen ? tlen : 1u);
    if (!scratch || !out)
        return fail("out of memory", NULL);
    st = km_apply(tmpl, tlen, plan, plen, pack, klen, out, tlen, scratch,
                  need);
    if (st != KM_OK)
        return fail(km_status_message(st), NULL);

    part = (char *)malloc(strlen(argv[4]) + 6);
    if (!part)
        return fail("out of memory", NULL);
    strcpy(part, argv[4]);
    strcat(part, ".part");
    f = fopen(part, "wb");
    if (!f)
        return fail("cannot write", part);
    ok = fwrite(out, 1, tlen, f) == tlen;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(part, argv[4]) != 0) {
        remove(part);
        return fail("cannot write", argv[4]);
    }
    free(part);
    free(out);
    free(scratch);
    free(pack);
    free(plan);
    free(tmpl);
    return 0;
}
