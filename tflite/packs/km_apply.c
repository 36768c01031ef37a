/*
 * km_apply.c: the C applier of task packs. The contract (file formats and
 * arithmetic) is FORMAT.md; the API is documented in km_apply.h.
 *
 * Two passes: `check` validates the plan, the pack (every array of its
 * payload) and the template and computes the scratch size; only then does
 * `write_all` copy the template (unless in place) and patch it. The write
 * pass re-reads the same records through the same functions, so it never
 * meets anything the check pass did not accept.
 *
 * Compile with -ffp-contract=off (GCC's default in -std=c99 mode anyway);
 * needs IEEE float/double with FLT_EVAL_METHOD 0 (any FPU or soft-float
 * of a Cortex-M/A, x86-64 SSE; not the x87).
 */
#include "km_apply.h"

#include <math.h>
#include <string.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define PLAN_HEADER 96u
#define PACK_HEADER 80u
#define LAYER_WORDS 16u
#define HEAD_WORDS 8u
#define NO_ACTIVATION 0xFFFFFFFFu
#define WT_FLOAT32 0u
#define WT_FLOAT16 1u
#define WT_INT8 2u
#define PW_BLOCKSIZE 128u

static const uint8_t PLAN_MAGIC[8] = {'K', 'M', 'P', 'L', 'A', 'N', 0, 1};
static const uint8_t PACK_MAGIC[8] = {'K', 'M', 'P', 'A', 'C', 'K', 0, 1};

/* ------------------------------------------------------------------ */
/* Little-endian access at any alignment                               */

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint16_t rd16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static float rdf(const uint8_t *p)
{
    uint32_t bits = rd32(p);
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

static void wr16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void wrf(uint8_t *p, float value)
{
    uint32_t bits;
    memcpy(&bits, &value, 4);
    wr32(p, bits);
}

/* ------------------------------------------------------------------ */
/* CRC-32 (zlib: reflected, polynomial 0xEDB88320), a nibble at a time */

static const uint32_t CRC_NIBBLE[16] = {
    0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu,
    0x76DC4190u, 0x6B6B51F4u, 0x4DB26158u, 0x5005713Cu,
    0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu,
    0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu};

uint32_t km_crc32(uint32_t crc, const uint8_t *data, size_t len)
{
    crc = ~crc;
    while (len--) {
        crc ^= *data++;
        crc = (crc >> 4) ^ CRC_NIBBLE[crc & 15u];
        crc = (crc >> 4) ^ CRC_NIBBLE[crc & 15u];
    }
    return ~crc;
}

/* ------------------------------------------------------------------ */
/* IEEE half precision                                                 */

uint16_t km_float_to_half(float value)
{
    uint32_t f, a, sign;
    memcpy(&f, &value, 4);
    sign = (f >> 16) & 0x8000u;
    a = f & 0x7FFFFFFFu;
    if (a > 0x7F800000u) /* NaN: quiet, keep the top payload bits */
        return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
    if (a >= 0x477FF000u) /* >= 65520 (or inf): rounds to infinity */
        return (uint16_t)(sign | 0x7C00u);
    if (a >= 0x38800000u) { /* normal half: >= 2^-14 */
        uint32_t r = a - 0x38000000u; /* rebias the exponent 127 -> 15 */
        r += 0x0FFFu + ((r >> 13) & 1u); /* round to nearest even */
        return (uint16_t)(sign | (r >> 13));
    }
    if (a < 0x33000000u) /* < 2^-25 (2^-25 itself ties to even 0) */
        return (uint16_t)sign;
    {
        /* subnormal half: units of 2^-24 */
        uint32_t e = a >> 23;
        uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126u - e; /* 14 .. 24 */
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u)))
            q++;
        return (uint16_t)(sign | q);
    }
}

float km_half_to_float(uint16_t h)
{
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t e = ((uint32_t)h >> 10) & 0x1Fu;
    uint32_t m = (uint32_t)h & 0x3FFu;
    uint32_t f;
    float value;
    if (e == 0x1Fu) {
        f = sign | 0x7F800000u | (m << 13);
    } else if (e != 0) {
        f = sign | ((e + 112u) << 23) | (m << 13);
    } else if (m == 0) {
        f = sign;
    } else {
        e = 113u;
        while (!(m & 0x400u)) {
            m <<= 1;
            e--;
        }
        f = sign | (e << 23) | ((m & 0x3FFu) << 13);
    }
    memcpy(&value, &f, 4);
    return value;
}

/* ------------------------------------------------------------------ */
/* Status messages                                                     */

const char *km_status_message(km_status status)
{
    switch (status) {
    case KM_OK: return "ok";
    case KM_ERR_ARGUMENT: return "km_apply: a NULL buffer was passed";
    case KM_ERR_PLAN:
        return "plan: not a km plan (wrong magic, version or header size)";
    case KM_ERR_PLAN_TRUNCATED:
        return "plan is truncated (shorter than its header says)";
    case KM_ERR_PLAN_CORRUPT: return "plan is corrupt (CRC-32 mismatch)";
    case KM_ERR_PLAN_INVALID:
        return "plan is invalid (a field or offset out of range)";
    case KM_ERR_PACK:
        return "pack: not a km pack (wrong magic, version or header size)";
    case KM_ERR_PACK_TRUNCATED:
        return "pack is truncated (shorter than its header says)";
    case KM_ERR_PACK_CORRUPT: return "pack is corrupt (CRC-32 mismatch)";
    case KM_ERR_PACK_INVALID:
        return "pack is invalid (bad array, flags, unit_axes or hidden for "
               "the plan's layers)";
    case KM_ERR_MISMATCH:
        return "pack was made for another template (fingerprint differs "
               "from the plan's)";
    case KM_ERR_COUNTS:
        return "pack does not fit the plan (layer, activation or feature "
               "count differs, or classes not in 1..C)";
    case KM_ERR_TEMPLATE:
        return "template is not the plan's (size or CRC-32 differs)";
    case KM_ERR_OUTPUT:
        return "output buffer is not the template's size, or overlaps it "
               "without being it";
    case KM_ERR_SCRATCH:
        return "scratch buffer too small (see km_scratch_bytes)";
    }
    return "unknown km_apply status";
}

/* ------------------------------------------------------------------ */
/* Parsed views (all on the stack; pointers into the caller's buffers) */

typedef struct {
    const uint8_t *plan;
    size_t plan_len;
    const uint8_t *pack;
    size_t pack_len;
    uint64_t tmpl_len; /* the plan's template bytes */
    uint32_t wtype, exact, residual, L, A, C, F, n;
} km_ctx;

typedef struct {
    uint32_t kind, kh, kw, cin, cout, mult;
    uint32_t k_off, ks_off, b_off, bs_off, act;
    uint32_t m_off, o_off, cb_off, w_off;
    uint64_t elements; /* kernel elements */
} km_layer;

typedef struct {
    const uint8_t *p; /* first element */
    uint32_t type;
    float scale; /* int8 arrays */
} km_array;

typedef struct {
    uint32_t flags, unit_axes, hidden;
    uint64_t u, cols;
    km_array U, c, V, d, m, o;
} km_mod;

static float arr_get(const km_array *a, size_t i)
{
    if (a->type == WT_FLOAT32)
        return rdf(a->p + 4 * i);
    if (a->type == WT_FLOAT16)
        return km_half_to_float(rd16(a->p + 2 * i));
    return (float)(int8_t)a->p[i] * a->scale;
}

/* a range [off, off + count * size) inside [0, limit)? */
static int in_range(uint64_t off, uint64_t count, uint64_t size,
                    uint64_t limit)
{
    if (off > limit || size == 0)
        return off <= limit;
    return count <= (limit - off) / size;
}

static uint64_t weight_size(uint32_t wtype)
{
    return wtype == WT_FLOAT32 ? 4u : (wtype == WT_FLOAT16 ? 2u : 1u);
}

static km_status read_layer(const km_ctx *cx, uint32_t index, km_layer *ly)
{
    const uint8_t *r = cx->plan + PLAN_HEADER + (size_t)index * 64u;
    uint64_t t = cx->tmpl_len, plan = cx->plan_len, cout, es, bias_size;
    ly->kind = rd32(r);
    ly->kh = rd32(r + 4);
    ly->kw = rd32(r + 8);
    ly->cin = rd32(r + 12);
    ly->cout = rd32(r + 16);
    ly->mult = rd32(r + 20);
    ly->k_off = rd32(r + 28);
    ly->ks_off = rd32(r + 32);
    ly->b_off = rd32(r + 36);
    ly->bs_off = rd32(r + 40);
    ly->act = rd32(r + 44);
    ly->m_off = rd32(r + 48);
    ly->o_off = rd32(r + 52);
    ly->cb_off = rd32(r + 56);
    ly->w_off = rd32(r + 60);
    cout = ly->cout;
    if (ly->kind > 1 || !ly->kh || !ly->kw || !ly->cin || !cout || !ly->mult)
        return KM_ERR_PLAN_INVALID;
    if (ly->kind == 0 && ly->mult != 1)
        return KM_ERR_PLAN_INVALID;
    if (ly->kind == 1 && (uint64_t)ly->cin * ly->mult != cout)
        return KM_ERR_PLAN_INVALID;
    /* elements = kh*kw*cin*cout (Conv2D) or kh*kw*cout (depthwise), each
     * partial product bounded by the template size */
    ly->elements = (uint64_t)ly->kh * ly->kw;
    if (ly->elements > t)
        return KM_ERR_PLAN_INVALID;
    if (ly->kind == 0) {
        ly->elements *= ly->cin;
        if (ly->elements > t)
            return KM_ERR_PLAN_INVALID;
    }
    if (cout > t || ly->elements * cout > t)
        return KM_ERR_PLAN_INVALID;
    ly->elements *= cout;
    es = weight_size(cx->wtype);
    bias_size = cx->wtype == WT_FLOAT16 ? 2u : 4u;
    /* offset 0 (the flatbuffer's root) is never a tensor's data; a bias
     * offset of 0 means the template has no bias tensor for the layer */
    if (!ly->k_off || !in_range(ly->k_off, ly->elements, es, t) ||
        !in_range(ly->b_off, cout, bias_size, t))
        return KM_ERR_PLAN_INVALID;
    if (cx->wtype == WT_INT8 &&
        (!ly->ks_off || !in_range(ly->ks_off, cout, 4, t) ||
         (ly->b_off && (!ly->bs_off || !in_range(ly->bs_off, cout, 4, t))) ||
         ly->act >= cx->A))
        return KM_ERR_PLAN_INVALID;
    if (ly->m_off < PLAN_HEADER || ly->o_off < PLAN_HEADER ||
        ly->cb_off < PLAN_HEADER || !in_range(ly->m_off, cout, 4, plan) ||
        !in_range(ly->o_off, cout, 4, plan) ||
        !in_range(ly->cb_off, cout, 4, plan))
        return KM_ERR_PLAN_INVALID;
    if (cx->exact && (ly->w_off < PLAN_HEADER ||
                      !in_range(ly->w_off, ly->elements, 4, plan)))
        return KM_ERR_PLAN_INVALID;
    if (cx->residual && (ly->w_off < PLAN_HEADER ||
                         !in_range(ly->w_off, ly->elements, 1, plan)))
        return KM_ERR_PLAN_INVALID;
    return KM_OK;
}

/* Reads one array of `count` elements at *pos of the pack (bounded by the
 * pack's length), moving *pos past its padding. */
static int take_array(const km_ctx *cx, size_t *pos, uint64_t count,
                      km_array *a)
{
    size_t end = cx->pack_len, at = *pos;
    uint64_t bytes, padded;
    if (end - at < 4)
        return 0;
    a->type = rd32(cx->pack + at);
    a->scale = 1.0f;
    at += 4;
    if (a->type > WT_INT8)
        return 0;
    if (a->type == WT_INT8) {
        if (end - at < 4)
            return 0;
        a->scale = rdf(cx->pack + at);
        at += 4;
    }
    if (!in_range(0, count, weight_size(a->type), end - at))
        return 0;
    bytes = count * weight_size(a->type);
    padded = (bytes + 3u) & ~(uint64_t)3u;
    if (padded > end - at)
        return 0;
    a->p = cx->pack + at;
    *pos = at + (size_t)padded;
    return 1;
}

/* The pack's record for layer `ly` at *pos. */
static km_status read_pack_layer(const km_ctx *cx, const km_layer *ly,
                                 size_t *pos, km_mod *md)
{
    size_t at = *pos;
    if (cx->pack_len - at < 12)
        return KM_ERR_PACK_INVALID;
    md->flags = rd32(cx->pack + at);
    md->unit_axes = rd32(cx->pack + at + 4);
    md->hidden = rd32(cx->pack + at + 8);
    at += 12;
    if (md->flags > 3u)
        return KM_ERR_PACK_INVALID;
    md->u = (uint64_t)ly->kh * ly->kw;
    if (md->unit_axes == 3)
        md->u *= ly->cin;
    md->cols = ly->elements / md->u;
    if (md->flags & 1u) {
        /* unit_axes and hidden are only read (and checked) with a
         * modulator, like the Python reader (1 <= hidden <= 65535) */
        uint64_t h = md->hidden, uh;
        if ((md->unit_axes != 2 && md->unit_axes != 3) || h == 0 ||
            h > 65535u || md->cols % ly->cout != 0)
            return KM_ERR_PACK_INVALID;
        uh = md->u * h; /* u <= template bytes < 2^32, h < 2^32 */
        if (!take_array(cx, &at, uh, &md->U) ||
            !take_array(cx, &at, h, &md->c) ||
            !take_array(cx, &at, uh, &md->V) ||
            !take_array(cx, &at, md->u, &md->d))
            return KM_ERR_PACK_INVALID;
    }
    if (md->flags & 2u) {
        if (!take_array(cx, &at, ly->cout, &md->m) ||
            !take_array(cx, &at, ly->cout, &md->o))
            return KM_ERR_PACK_INVALID;
    }
    *pos = at;
    return KM_OK;
}

static km_status check_header(const uint8_t *buf, size_t len,
                              const uint8_t *magic, uint32_t header,
                              km_status bad, km_status truncated,
                              km_status corrupt)
{
    size_t k = len < 8 ? len : 8;
    if (memcmp(buf, magic, k) != 0)
        return bad;
    if (len < header)
        return truncated;
    if (rd32(buf + 8) != 1u || rd32(buf + 12) != header)
        return bad;
    if (km_crc32(0, buf, header - 4) != rd32(buf + header - 4))
        return corrupt;
    return KM_OK;
}

/* Validates plan and pack (and the template when given); sets *need to the
 * scratch bytes. */
static km_status check(km_ctx *cx, const uint8_t *tmpl, size_t tmpl_len,
                       size_t *need)
{
    const uint8_t *plan = cx->plan, *pack = cx->pack;
    km_status st;
    uint64_t body, payload, table, t, es, bias_size;
    const uint8_t *head;
    size_t pos;
    uint32_t i, C;
    uint64_t most = 0;

    st = check_header(plan, cx->plan_len, PLAN_MAGIC, PLAN_HEADER,
                      KM_ERR_PLAN, KM_ERR_PLAN_TRUNCATED,
                      KM_ERR_PLAN_CORRUPT);
    if (st != KM_OK)
        return st;
    body = rd32(plan + 80);
    if (cx->plan_len < body)
        return KM_ERR_PLAN_TRUNCATED;
    if (cx->plan_len != body)
        return KM_ERR_PLAN_INVALID;
    if (km_crc32(0, plan + PLAN_HEADER, cx->plan_len - PLAN_HEADER) !=
        rd32(plan + 84))
        return KM_ERR_PLAN_CORRUPT;

    st = check_header(pack, cx->pack_len, PACK_MAGIC, PACK_HEADER,
                      KM_ERR_PACK, KM_ERR_PACK_TRUNCATED,
                      KM_ERR_PACK_CORRUPT);
    if (st != KM_OK)
        return st;
    payload = rd32(pack + 48);
    if (cx->pack_len - PACK_HEADER < payload)
        return KM_ERR_PACK_TRUNCATED;
    if (cx->pack_len - PACK_HEADER != payload)
        return KM_ERR_PACK_INVALID;
    if (km_crc32(0, pack + PACK_HEADER, cx->pack_len - PACK_HEADER) !=
        rd32(pack + 52))
        return KM_ERR_PACK_CORRUPT;

    if (memcmp(plan + 16, pack + 16, 32) != 0)
        return KM_ERR_MISMATCH;

    cx->tmpl_len = t = rd32(plan + 48);
    if (tmpl) {
        if ((uint64_t)tmpl_len != t ||
            km_crc32(0, tmpl, tmpl_len) != rd32(plan + 52))
            return KM_ERR_TEMPLATE;
    }

    cx->wtype = rd32(plan + 56);
    cx->exact = rd32(plan + 60);
    cx->L = rd32(plan + 64);
    cx->A = rd32(plan + 68);
    cx->C = C = rd32(plan + 72);
    cx->F = rd32(plan + 76);
    cx->residual = (cx->exact >> 1) & 1u;
    if ((cx->exact & ~3u) || (cx->exact & 1u && cx->residual) ||
        (cx->residual && cx->wtype != WT_INT8))
        return KM_ERR_PLAN_INVALID;
    cx->exact &= 1u;
    if (cx->wtype > WT_INT8 || (cx->wtype != WT_INT8 && cx->A != 0) ||
        C == 0 || cx->F == 0)
        return KM_ERR_PLAN_INVALID;
    table = PLAN_HEADER + 64u * (uint64_t)cx->L + 32u + 8u * (uint64_t)cx->A;
    if (table > body)
        return KM_ERR_PLAN_INVALID;

    if (rd32(pack + 56) != cx->L || rd32(pack + 60) != cx->A ||
        rd32(pack + 68) != cx->F)
        return KM_ERR_COUNTS;
    cx->n = rd32(pack + 64);
    if (cx->n == 0 || cx->n > C)
        return KM_ERR_COUNTS;

    /* head record and activation table */
    head = plan + PLAN_HEADER + 64u * (size_t)cx->L;
    es = weight_size(cx->wtype);
    bias_size = cx->wtype == WT_FLOAT16 ? 2u : 4u;
    if ((uint64_t)C * cx->F > t || !rd32(head) || !rd32(head + 8) ||
        !in_range(rd32(head), (uint64_t)C * cx->F, es, t) ||
        !in_range(rd32(head + 8), C, bias_size, t))
        return KM_ERR_PLAN_INVALID;
    if (cx->wtype == WT_INT8 &&
        (!rd32(head + 4) || !rd32(head + 12) ||
         !in_range(rd32(head + 4), C, 4, t) ||
         !in_range(rd32(head + 12), C, 4, t) || rd32(head + 16) >= cx->A))
        return KM_ERR_PLAN_INVALID;
    for (i = 0; i < cx->A; i++) {
        const uint8_t *rec = head + 32 + 8u * (size_t)i;
        if (!rd32(rec) || !rd32(rec + 4) || !in_range(rd32(rec), 1, 4, t) ||
            !in_range(rd32(rec + 4), 1, 8, t))
            return KM_ERR_PLAN_INVALID;
    }

    /* layers, against the pack's payload */
    pos = PACK_HEADER;
    for (i = 0; i < cx->L; i++) {
        km_layer ly;
        km_mod md;
        uint64_t bytes;
        st = read_layer(cx, i, &ly);
        if (st != KM_OK)
            return st;
        st = read_pack_layer(cx, &ly, &pos, &md);
        if (st != KM_OK)
            return st;
        bytes = ((4u * (ly.elements / ly.cout) + 7u) & ~(uint64_t)7u) +
                ((md.flags & 1u) ? 8u * (uint64_t)md.hidden : 0u);
        if (bytes > most)
            most = bytes;
    }
    {
        km_array w, b;
        if (!take_array(cx, &pos, (uint64_t)cx->F * cx->n, &w) ||
            !take_array(cx, &pos, cx->n, &b))
            return KM_ERR_PACK_INVALID;
    }
    if (cx->pack_len - pos != 8u * (uint64_t)cx->A)
        return KM_ERR_PACK_INVALID;
    most += 7u;
    if (most > (size_t)-1)
        return KM_ERR_PLAN_INVALID;
    *need = (size_t)most;
    return KM_OK;
}

/* ------------------------------------------------------------------ */
/* Arithmetic                                                          */

/* Where a layer's float32 base weights come from (the plan's float32
 * kernel, or the template's weight divided by the base multiplier). */
typedef struct {
    const km_ctx *cx;
    const uint8_t *tmpl;
    const km_layer *ly;
} km_source;

/* Index in the template's layout of Keras element p * cout + ch. */
static size_t template_index(const km_layer *ly, size_t p, size_t ch,
                             size_t per_channel)
{
    return ly->kind == 0 ? ch * per_channel + p : p * ly->cout + ch;
}

/* The float32 base weight at Keras index i (= p * cout + ch). */
static float base_weight(const km_source *src, size_t i)
{
    const km_ctx *cx = src->cx;
    const km_layer *ly = src->ly;
    const uint8_t *tmpl = src->tmpl, *plan = cx->plan;
    size_t cout = ly->cout, per = (size_t)(ly->elements / cout);
    size_t p = i / cout, ch = i % cout, ti;
    float w;
    if (cx->exact)
        return rdf(plan + ly->w_off + 4 * i);
    ti = template_index(ly, p, ch, per);
    if (cx->wtype == WT_FLOAT32)
        w = rdf(tmpl + ly->k_off + 4 * ti);
    else if (cx->wtype == WT_FLOAT16)
        w = km_half_to_float(rd16(tmpl + ly->k_off + 2 * ti));
    else if (cx->residual)
        /* The weight's int8 value refined by its residual (1/254 of a
         * quantization step), in double. */
        w = (float)(((double)(int8_t)tmpl[ly->k_off + ti] +
                     (double)(int8_t)plan[ly->w_off + ti] / 254.0) *
                    (double)rdf(tmpl + ly->ks_off + 4 * ch));
    else
        w = (float)(int8_t)tmpl[ly->k_off + ti] *
            rdf(tmpl + ly->ks_off + 4 * ch);
    return w / rdf(plan + ly->m_off + 4 * ch);
}

/* numpy's pairwise summation of float64 (add.reduce over a contiguous
 * array) of the base weights first .. first + n - 1 or, with `centre`
 * set, of their (w - mean)^2. */
static double term(const km_source *src, size_t i, int centre, double mean)
{
    double v = (double)base_weight(src, i);
    if (centre) {
        v -= mean;
        v *= v;
    }
    return v;
}

static double pairwise_sum(const km_source *src, size_t first, size_t n,
                           int centre, double mean)
{
    if (n < 8) {
        double res = 0.;
        size_t i;
        for (i = 0; i < n; i++)
            res += term(src, first + i, centre, mean);
        return res;
    } else if (n <= PW_BLOCKSIZE) {
        double r[8], res;
        size_t i, j;
        for (j = 0; j < 8; j++)
            r[j] = term(src, first + j, centre, mean);
        for (i = 8; i < n - (n % 8); i += 8)
            for (j = 0; j < 8; j++)
                r[j] += term(src, first + i + j, centre, mean);
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++)
            res += term(src, first + i, centre, mean);
        return res;
    } else {
        size_t n2 = n / 2;
        n2 -= n2 % 8;
        return pairwise_sum(src, first, n2, centre, mean) +
               pairwise_sum(src, first + n2, n - n2, centre, mean);
    }
}

/* population standard deviation of a layer's base weights, as numpy.std
 * of a float64 array */
static double population_std(const km_source *src)
{
    size_t n = (size_t)src->ly->elements;
    double mean = (0.0 + pairwise_sum(src, 0, n, 0, 0.0)) / (double)n;
    double var = (0.0 + pairwise_sum(src, 0, n, 1, mean)) / (double)n;
    return sqrt(var);
}

/* k[p] <- the modulated weight p * cout + ch of the layer, for one output
 * channel: float32(W * (1 + V tanh(U (W / s) + c) + d)) on each of the
 * channel's unit columns n = ch + t * cout of the (u x cols) view (every
 * element of such a column belongs to channel ch, as cols is a multiple of
 * cout; element j of column t is k[j * (cols / cout) + t]). hid: h
 * doubles. Without a modulator, k[p] is the base weight. */
static void channel_weights(const km_source *src, const km_mod *md,
                            double s, size_t ch, float *k, double *hid)
{
    size_t cout = src->ly->cout, per = (size_t)(src->ly->elements / cout);
    size_t u = (size_t)md->u, h = md->hidden;
    size_t stride = (size_t)(md->cols / cout), t, i, j, p;
    for (p = 0; p < per; p++)
        k[p] = base_weight(src, p * cout + ch);
    if (!(md->flags & 1u))
        return;
    for (t = 0; t < stride; t++) {
        /* hid[i] = sum_j U[i][j] * (X[j][n] / s), summed in j order for
         * each i (the same sums as row by row), one division per weight */
        for (i = 0; i < h; i++)
            hid[i] = 0.0;
        for (j = 0; j < u; j++) {
            double xs = (double)k[j * stride + t] / s;
            for (i = 0; i < h; i++)
                hid[i] += (double)arr_get(&md->U, i * u + j) * xs;
        }
        for (i = 0; i < h; i++)
            hid[i] = tanh(hid[i] + (double)arr_get(&md->c, i));
        for (j = 0; j < u; j++) {
            double g = 0.0;
            for (i = 0; i < h; i++)
                g += (double)arr_get(&md->V, j * h + i) * hid[i];
            g += (double)arr_get(&md->d, j);
            k[j * stride + t] =
                (float)((double)k[j * stride + t] * (1.0 + g));
        }
    }
}


/* Nearest integer, ties away from zero, of a float32 value (exact in
 * double). */
static double km_round_half_away(double x)
{
    double r = floor(fabs(x) + 0.5);
    return x < 0.0 ? -r : r;
}

/* round(v * (1 / scale)) as the converter computes it: the reciprocal and
 * the product in float32 (a division rounds some near-ties the other way),
 * ties away from zero, clamped to [low, high]; NaN gives 0. */
static double quantize(float v, float scale, double low, double high)
{
    float inverse = 1.0f / scale;
    float product = v * inverse;
    double q = km_round_half_away((double)product);
    if (q != q)
        return 0.0;
    return q < low ? low : (q > high ? high : q);
}

static int8_t quantize8(float v, float scale)
{
    return (int8_t)quantize(v, scale, -127.0, 127.0);
}

/* The int32 bias, of scale `scale * input_scale` (a float32 product). */
static uint32_t quantize32(float bias, float scale, float input_scale)
{
    return (uint32_t)(int32_t)quantize(bias, scale * input_scale,
                                       -2147483648.0, 2147483647.0);
}

/* max(amax, |v|) in float32 (no double op per weight on a device) */
static float float_max_abs(float amax, float v)
{
    float a = v < 0.0f ? -v : v;
    return a > amax ? a : amax;
}

static float channel_scale(float amax)
{
    double a = (double)amax;
    if (a < 5e-7)
        a = 5e-7;
    return (float)(a / 127.0);
}

static float activation_scale(const km_ctx *cx, uint32_t act)
{
    return rdf(cx->pack + cx->pack_len - 8u * (size_t)cx->A + 8u * act);
}

/* Scratch bytes of one output channel's float weights, a multiple of 8. */
static size_t channel_bytes(const km_layer *ly)
{
    return (size_t)((4u * (ly->elements / ly->cout) + 7u) & ~(uint64_t)7u);
}

/* The layer, one output channel at a time: 1. base weights, 2. modulation
 * (std over the whole kernel first), 3. BN fold (float32), 4. write. Each
 * channel reads only its own template weights before writing them, so an
 * in-place patch is safe. k: the channel's float weights, hid: h doubles. */
static void write_layer(const km_ctx *cx, const uint8_t *tmpl, uint8_t *out,
                        const km_layer *ly, const km_mod *md, float *k,
                        double *hid)
{
    const uint8_t *plan = cx->plan;
    size_t cout = ly->cout, per = (size_t)(ly->elements / cout);
    size_t p, ch;
    km_source src;
    double s = 0.0;
    src.cx = cx;
    src.tmpl = tmpl;
    src.ly = ly;
    if (md->flags & 1u)
        s = population_std(&src) + 1e-12;
    for (ch = 0; ch < cout; ch++) {
        float m, o, bias, amax = 0.0f, scale;
        channel_weights(&src, md, s, ch, k, hid);
        if (md->flags & 2u) {
            m = arr_get(&md->m, ch);
            o = arr_get(&md->o, ch);
        } else {
            m = rdf(plan + ly->m_off + 4 * ch);
            o = rdf(plan + ly->o_off + 4 * ch);
        }
        bias = rdf(plan + ly->cb_off + 4 * ch) * m;
        bias = bias + o;
        for (p = 0; p < per; p++) {
            float v = k[p] * m;
            k[p] = v;
            amax = float_max_abs(amax, v);
        }
        if (cx->wtype == WT_FLOAT32) {
            for (p = 0; p < per; p++)
                wrf(out + ly->k_off + 4 * template_index(ly, p, ch, per),
                    k[p]);
            if (ly->b_off)
                wrf(out + ly->b_off + 4 * ch, bias);
        } else if (cx->wtype == WT_FLOAT16) {
            for (p = 0; p < per; p++)
                wr16(out + ly->k_off + 2 * template_index(ly, p, ch, per),
                     km_float_to_half(k[p]));
            if (ly->b_off)
                wr16(out + ly->b_off + 2 * ch, km_float_to_half(bias));
        } else {
            float in_scale = activation_scale(cx, ly->act);
            scale = channel_scale(amax);
            for (p = 0; p < per; p++)
                out[ly->k_off + template_index(ly, p, ch, per)] =
                    (uint8_t)quantize8(k[p], scale);
            wrf(out + ly->ks_off + 4 * ch, scale);
            if (ly->b_off) {
                wrf(out + ly->bs_off + 4 * ch, scale * in_scale);
                wr32(out + ly->b_off + 4 * ch,
                     quantize32(bias, scale, in_scale));
            }
        }
    }
}

/* The head: pack W (F x n, Keras) and b (n), padded to C classes, written
 * into the template's [C, F] like a layer with m = 1, o = 0. */
static void write_head(const km_ctx *cx, uint8_t *out, const km_array *w,
                       const km_array *b)
{
    const uint8_t *head = cx->plan + PLAN_HEADER + 64u * (size_t)cx->L;
    uint32_t w_off = rd32(head), ws_off = rd32(head + 4);
    uint32_t b_off = rd32(head + 8), bs_off = rd32(head + 12);
    size_t F = cx->F, n = cx->n, C = cx->C, k, f;
    for (k = 0; k < C; k++) {
        float bias = 0.0f, amax = 0.0f;
        if (k < n)
            bias = arr_get(b, k);
        if (cx->wtype == WT_INT8) {
            float scale, in_scale;
            if (k < n)
                for (f = 0; f < F; f++) {
                    amax = float_max_abs(amax, arr_get(w, f * n + k));
                }
            scale = channel_scale(amax);
            in_scale = activation_scale(cx, rd32(head + 16));
            for (f = 0; f < F; f++)
                out[w_off + k * F + f] = (uint8_t)(
                    k < n ? quantize8(arr_get(w, f * n + k), scale) : 0);
            wrf(out + ws_off + 4 * k, scale);
            wrf(out + bs_off + 4 * k, scale * in_scale);
            wr32(out + b_off + 4 * k, quantize32(bias, scale, in_scale));
        } else {
            for (f = 0; f < F; f++) {
                float v = k < n ? arr_get(w, f * n + k) : 0.0f;
                if (cx->wtype == WT_FLOAT32)
                    wrf(out + w_off + 4 * (k * F + f), v);
                else
                    wr16(out + w_off + 2 * (k * F + f), km_float_to_half(v));
            }
            if (cx->wtype == WT_FLOAT32)
                wrf(out + b_off + 4 * k, bias);
            else
                wr16(out + b_off + 2 * k, km_float_to_half(bias));
        }
    }
}

static void write_all(const km_ctx *cx, const uint8_t *tmpl, uint8_t *out,
                      uint8_t *scratch)
{
    const uint8_t *acts = cx->plan + PLAN_HEADER + 64u * (size_t)cx->L + 32u;
    size_t pos = PACK_HEADER;
    uint32_t i;
    km_array w, b;
    for (i = 0; i < cx->L; i++) {
        km_layer ly;
        km_mod md;
        (void)read_layer(cx, i, &ly); /* accepted by check() */
        (void)read_pack_layer(cx, &ly, &pos, &md);
        write_layer(cx, tmpl, out, &ly, &md, (float *)(void *)scratch,
                    (double *)(void *)(scratch + channel_bytes(&ly)));
    }
    (void)take_array(cx, &pos, (uint64_t)cx->F * cx->n, &w);
    (void)take_array(cx, &pos, cx->n, &b);
    write_head(cx, out, &w, &b);
    for (i = 0; i < cx->A; i++) {
        const uint8_t *rec = cx->pack + pos + 8u * (size_t)i;
        uint32_t zp = rd32(rec + 4);
        uint32_t high = (zp & 0x80000000u) ? 0xFFFFFFFFu : 0u;
        uint8_t *z = out + rd32(acts + 8u * i + 4);
        memcpy(out + rd32(acts + 8u * i), rec, 4); /* float32 scale */
        wr32(z, zp);
        wr32(z + 4, high);
    }
}

/* ------------------------------------------------------------------ */
/* API                                                                 */

size_t km_scratch_bytes(const uint8_t *plan, size_t plan_len,
                        const uint8_t *pack, size_t pack_len)
{
    km_ctx cx;
    size_t need = 0;
    if (!plan || !pack)
        return 0;
    memset(&cx, 0, sizeof cx);
    cx.plan = plan;
    cx.plan_len = plan_len;
    cx.pack = pack;
    cx.pack_len = pack_len;
    if (check(&cx, NULL, 0, &need) != KM_OK)
        return 0;
    return need;
}

km_status km_apply(const uint8_t *template_, size_t template_len,
                   const uint8_t *plan, size_t plan_len,
                   const uint8_t *pack, size_t pack_len,
                   uint8_t *out, size_t out_len,
                   void *scratch, size_t scratch_len)
{
    km_ctx cx;
    km_status st;
    size_t need = 0, skip;
    uintptr_t t0, o0;
    uint8_t *base;

    if (!template_ || !plan || !pack || !out)
        return KM_ERR_ARGUMENT;
    if (out_len != template_len)
        return KM_ERR_OUTPUT;
    t0 = (uintptr_t)template_;
    o0 = (uintptr_t)out;
    if (o0 != t0 && o0 < t0 + template_len && t0 < o0 + out_len)
        return KM_ERR_OUTPUT;
    memset(&cx, 0, sizeof cx);
    cx.plan = plan;
    cx.plan_len = plan_len;
    cx.pack = pack;
    cx.pack_len = pack_len;
    st = check(&cx, template_, template_len, &need);
    if (st != KM_OK)
        return st;
    if (!scratch || scratch_len < need)
        return KM_ERR_SCRATCH;

    /* scratch: each layer's float kernel from an 8-byte boundary, then
     * its h doubles (check() sized this as the largest such pair) */
    skip = (size_t)((8u - ((uintptr_t)scratch & 7u)) & 7u);
    base = (uint8_t *)scratch + skip;

    if (out != template_)
        memcpy(out, template_, template_len);
    write_all(&cx, template_, out, base);
    return KM_OK;
}
