/*
 * km_apply: turn a template .tflite + its plan (.kmplan) + a task pack
 * (.kmpack) into the task's .tflite, as specified in FORMAT.md (next to
 * this file). C99; no heap, no static mutable state, no I/O: the caller
 * owns every buffer.
 *
 * Build with -ffp-contract=off (and no -ffast-math): the BN fold and the
 * int8 bias scale are float32 products/sums that must not be contracted
 * into fused multiply-adds, or the bytes differ from the Python applier.
 *
 * Use:
 *     size_t need = km_scratch_bytes(plan, plan_len, pack, pack_len);
 *     // need == 0: the plan or pack is malformed (km_apply says why)
 *     km_status st = km_apply(tmpl, tmpl_len, plan, plan_len, pack,
 *                             pack_len, out, tmpl_len, scratch, need);
 *     if (st != KM_OK) puts(km_status_message(st));
 *
 * km_apply validates everything (magic, version, header sizes, header
 * CRCs, truncation, body/payload CRCs, the pack's fingerprint against the
 * plan's, the template's size and CRC-32 against the plan, counts, n <= C,
 * every offset and array, unit_axes/hidden of modulated layers) before it
 * writes a single byte of `out`; on any error `out` is untouched. `out` may
 * be the template's own buffer (in-place patch of a RAM image: out ==
 * template_); otherwise the two must not overlap, and the template is
 * copied into `out` only after validation. Plans without float32 base
 * kernels (compact mode, with or without int8 residuals) start from the
 * template's own weights. In place, compact mode reads a
 * layer's template kernel after earlier layers were written, which is the
 * same as reading the original because no two tensors share a buffer
 * (export_template refuses such templates). The template's SHA-256 is not
 * recomputed here (the Python applier does); the size + CRC-32 check
 * catches a wrong template. A patched image is not a template (its CRC
 * differs): keep the template and patch a copy per task switch.
 *
 * Like the Python applier: a layer's bias offset 0 means the template has
 * no bias tensor for it (nothing written); unit_axes and hidden are read
 * only for modulated layers (2 or 3; 1 <= hidden <= 65535); the pack's
 * array padding and the plan's reserved words are not checked (CRCs cover
 * them).
 *
 * Scratch (any alignment; km_scratch_bytes returns exactly this):
 *     7 + max over the plan's layers of
 *         roundup8(4 * E / cout) + (8 * h if the pack modulates the layer)
 * where E / cout = kh*kw*cin (Conv2D) or kh*kw (DepthwiseConv2D) is one
 * output channel's weight count and h the modulator's hidden width; the 7
 * bytes let the buffer start at any address. The layer is computed one
 * output channel at a time (its weights as float32, h doubles per unit
 * column); the head and the int8 maxima need no scratch. MobileNetV2 0.35
 * at 96 px: 1,359 bytes.
 *
 * Numerics: float64 as FORMAT.md says, in the Python applier's order:
 * s = std(W) + 1e-12 (population; numpy's pairwise summation),
 * H = tanh(U (X / s) + c), G = V H + d, W' = float32(X * (1 + G)); libm
 * tanh, round (half away from zero) and sqrt. The output is byte-identical
 * to km_tf.deploy.applier.apply_pack (tests/test_packs_c.py). Only the
 * float64 summation order of the two matrix products may differ from
 * numpy's BLAS (and tanh from numpy's SIMD tanh) in the last bit, which
 * would have to straddle a float32 rounding boundary to show.
 *
 * Stack: about 0.5 KB + 128 B per level of the pairwise summation's
 * recursion, log2(E / 128) levels (x86-64 -Os, gcc -fstack-usage).
 */
#ifndef KM_APPLY_H
#define KM_APPLY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    KM_OK = 0,
    KM_ERR_ARGUMENT,        /* a NULL pointer */
    KM_ERR_PLAN,            /* plan: wrong magic, version or header size */
    KM_ERR_PLAN_TRUNCATED,  /* plan shorter than its header says */
    KM_ERR_PLAN_CORRUPT,    /* plan header or body CRC-32 mismatch */
    KM_ERR_PLAN_INVALID,    /* plan field or offset out of range */
    KM_ERR_PACK,            /* pack: wrong magic, version or header size */
    KM_ERR_PACK_TRUNCATED,  /* pack shorter than its header says */
    KM_ERR_PACK_CORRUPT,    /* pack header or payload CRC-32 mismatch */
    KM_ERR_PACK_INVALID,    /* pack array, flags, unit_axes or hidden bad */
    KM_ERR_MISMATCH,        /* pack made for another template (fingerprint) */
    KM_ERR_COUNTS,          /* pack layer/activation/feature counts differ
                               from the plan's, or classes n not in 1..C */
    KM_ERR_TEMPLATE,        /* template size or CRC-32 differs from plan's */
    KM_ERR_OUTPUT,          /* out_len != template_len, or partial overlap */
    KM_ERR_SCRATCH          /* scratch smaller than km_scratch_bytes() */
} km_status;

/* Bytes of scratch km_apply needs for this plan and pack (formula above);
 * 0 when the plan or pack is malformed (no CRC is checked here). */
size_t km_scratch_bytes(const uint8_t *plan, size_t plan_len,
                        const uint8_t *pack, size_t pack_len);

/* Writes the task's .tflite (template_len bytes) into out[0..out_len).
 * out may equal template_. Returns KM_OK or an error; on error nothing has
 * been written to out. */
km_status km_apply(const uint8_t *template_, size_t template_len,
                   const uint8_t *plan, size_t plan_len,
                   const uint8_t *pack, size_t pack_len,
                   uint8_t *out, size_t out_len,
                   void *scratch, size_t scratch_len);

/* A one-line English message for a status (never NULL). */
const char *km_status_message(km_status status);

/* Helpers, exported for tests: zlib CRC-32 (start with crc = 0) and the
 * IEEE half-precision conversions (float32 -> float16 rounds to nearest
 * even, like numpy's astype(float16)). */
uint32_t km_crc32(uint32_t crc, const uint8_t *data, size_t len);
uint16_t km_float_to_half(float value);
float km_half_to_float(uint16_t bits);

#ifdef __cplusplus
}
#endif

#endif /* KM_APPLY_H */
