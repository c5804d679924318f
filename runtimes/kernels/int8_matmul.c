/* pipeline's native CPU kernels (domain com.pipeline), onnxruntime custom ops for x86-64 CPUs with AVX512-VNNI
 * or with AVX2 and FMA (the portable x86-64 build), and AArch64 CPUs with the dot-product instructions (ARMv8.2
 * and later):
 *
 * - StaticInt8MatMul: the static W8A8 MatMul of a QDQ graph (below);
 * - BlockInt8MatMul: an 8-bit MatMulNBits read as it is stored, or from codes stored packed at fewer bits
 *   (after StaticInt8MatMul);
 * - BlockGather: rows of those packed codes, dequantized: the token embedding of a tied table whose head is
 *   BlockInt8MatMul on packed codes (at the end);
 * - GluRotate: a gated MLP's act(gate) * up and the online rotation after it;
 * - CacheAttention: GroupQueryAttention's arithmetic on its in-place KV cache.
 *
 * StaticInt8MatMul:
 *
 *   y = (Q(x) - x_zero_point) . W * (x_scale * w_scale[n]),   Q(x) = saturate_u8(round_half_even(x / x_scale)
 *                                                                             + x_zero_point)
 *
 * which is what QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear(W, per-column scale, zero point
 * 0) computes, and what onnxruntime runs as QuantizeLinear + MatMulIntegerToFloat: the same integer products
 * (exact in int32) and the same float epilogue. Why it exists: onnxruntime's int8 GEMM reads a one-row
 * product's weights at ~65% of the machine's memory rate, and decode at batch 1 is that product, 121 times a
 * token for SmolLM2 (benchmarks/decode_floor.py). This kernel streams each weight once, in the order it is
 * stored.
 *
 * Inputs (exporters/cpu_kernels.py writes them):
 *   0 x           float  (..., K)
 *   1 w_packed    int8   (N/16, K/4, 64): W[4g + t, 16p + c] at [p, g, 4c + t], one 16-column panel after another
 *   2 w_scale     float  (N)
 *   3 w_colsum    int32  (N): sum over k of W[k, n], for the activation zero point
 *   4 x_scale     float  scalar
 *   5 x_zero_point uint8 scalar
 * Output: y float (..., N).
 *
 * Work is split over 4-panel (64-column) groups on onnxruntime's own intra-op thread pool
 * (KernelContext_ParallelFor), so the session's thread count holds. Rows go 4 at a time so that a prefill
 * loads each weight vector once per 4 rows.
 *
 * The packed layout suits every instruction set: one 64-byte group is 16 columns x 4 consecutive k, which
 * AVX512-VNNI's vpdpbusd (u8 x s8) takes as one register, NEON's sdot (vdotq_s32, s8 x s8) as four, 4
 * columns each, and AVX2's vpmaddwd as four quarters widened to int16 (rows go 2 at a time there: 16 vector
 * registers). NEON has no u8 x s8 dot product before i8mm, so on AArch64 the quantized activations are stored
 * minus 128 (as int8) and the zero point's correction becomes (zero_point - 128) * colsum: the same integers.
 */
#define _DEFAULT_SOURCE /* madvise under -std=c11 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KERNEL_AVX512 1
#include <immintrin.h>
#elif defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define KERNEL_AVX2 1
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#else
#error "pipeline's kernels need x86-64 with AVX2 and FMA (-mavx2 -mfma) or AVX512-VNNI (-mavx512f -mavx512bw -mavx512vl -mavx512vnni), or AArch64 with the dot product (-march=armv8.2-a+dotprod)"
#endif
#ifndef KERNEL_AVX512
#define KERNEL_AVX512 0
#endif
#ifndef KERNEL_AVX2
#define KERNEL_AVX2 0
#endif
/* the x86-64 builds keep 5-bit codes at 5 bits in memory ("5-bit codes kept at 5 bits" below); every build keeps
 * 4-bit codes at 4 bits ("4-bit codes kept at 4 bits") */
#define KERNEL_FIVE (KERNEL_AVX2 || KERNEL_AVX512)

#include "onnxruntime_c_api.h"

static const OrtApi* g_api;

#define RETURN_IF_ERROR(expr)            \
    do {                                 \
        OrtStatus* status_ = (expr);     \
        if (status_) return status_;     \
    } while (0)

typedef struct {
    const uint8_t* xq;      /* (M, K) quantized activations (AArch64: minus 128, as int8) */
    const int8_t* w;        /* packed */
    const float* w_scale;
    const int32_t* colsum;
    float x_scale;
    int32_t x_zero_point;
    int narrow;             /* every |W| <= 64 (7-bit weights): u8 x s8 pair sums fit int16 (the AVX2 build) */
    float* y;               /* (M, N) */
    int64_t m, k, n, panels, groups, chunks;
} Job;

#if KERNEL_AVX512
/* QuantizeLinear as onnxruntime computes it: x / scale clamped to [-zero_point, 255 - zero_point] in float (so
 * huge values and infinities saturate, and NaN goes to the low end), rounded half to even, plus zero_point. */
static inline __m128i quantize16(__m512 x, __m512 scale, __m512 lo, __m512 hi, __m512i zero_point) {
    const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(x, scale), lo), hi);
    const __m512i r = _mm512_add_epi32(_mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                       zero_point);
    return _mm512_cvtepi32_epi8(r);
}

static void quantize(const float* x, uint8_t* q, int64_t count, float scale, int32_t zero_point) {
    const __m512 s = _mm512_set1_ps(scale), lo = _mm512_set1_ps((float)-zero_point),
                 hi = _mm512_set1_ps((float)(255 - zero_point));
    const __m512i z = _mm512_set1_epi32(zero_point);
    int64_t i = 0;
    for (; i + 16 <= count; i += 16)
        _mm_storeu_si128((__m128i*)(q + i), quantize16(_mm512_loadu_ps(x + i), s, lo, hi, z));
    if (i < count) {
        const __mmask16 mask = (__mmask16)((1u << (count - i)) - 1);
        _mm_mask_storeu_epi8(q + i, mask, quantize16(_mm512_maskz_loadu_ps(mask, x + i), s, lo, hi, z));
    }
}

/* NP panels (16 columns each) x NM rows starting at (row m, panel p); constant NP / NM unroll fully. */
static inline __attribute__((always_inline)) void block(const Job* j, int64_t m, int64_t p, const int NP,
                                                         const int NM) {
    const int64_t groups_k = j->k / 4;
    __m512i acc[4][4];
    const int8_t* panel[4];
    const uint8_t* row[4];
    for (int r = 0; r < NM; r++) {
        row[r] = j->xq + (m + r) * j->k;
        for (int c = 0; c < NP; c++) acc[r][c] = _mm512_setzero_si512();
    }
    for (int c = 0; c < NP; c++) panel[c] = j->w + (p + c) * groups_k * 64;
    for (int64_t g = 0; g < groups_k; g++) {
        __m512i b[4];
        for (int c = 0; c < NP; c++) b[c] = _mm512_loadu_si512(panel[c] + g * 64);
        for (int r = 0; r < NM; r++) {
            int32_t four;
            memcpy(&four, row[r] + 4 * g, 4);
            const __m512i a = _mm512_set1_epi32(four);
            for (int c = 0; c < NP; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], a, b[c]);
        }
    }
    const __m512i zero_point = _mm512_set1_epi32(j->x_zero_point);
    const __m512 x_scale = _mm512_set1_ps(j->x_scale);
    for (int c = 0; c < NP; c++) {
        const int64_t n0 = (p + c) * 16;
        const __m512i correction = _mm512_mullo_epi32(_mm512_loadu_si512(j->colsum + n0), zero_point);
        const __m512 scale = _mm512_mul_ps(x_scale, _mm512_loadu_ps(j->w_scale + n0));
        for (int r = 0; r < NM; r++) {
            const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], correction));
            _mm512_storeu_ps(j->y + (m + r) * j->n + n0, _mm512_mul_ps(v, scale));
        }
    }
}

#elif KERNEL_AVX2
/* The same QuantizeLinear in 256-bit registers: vmaxps returns its second operand for NaN (the low end), as
 * above; vcvtps2dq rounds half to even (the default rounding mode). */
static void quantize(const float* x, uint8_t* q, int64_t count, float scale, int32_t zero_point) {
    const __m256 s = _mm256_set1_ps(scale), lo = _mm256_set1_ps((float)-zero_point),
                 hi = _mm256_set1_ps((float)(255 - zero_point));
    const __m256i z = _mm256_set1_epi32(zero_point);
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
        __m256i r[2];
        for (int h = 0; h < 2; h++) {
            const __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(x + i + 8 * h), s), lo), hi);
            r[h] = _mm256_add_epi32(_mm256_cvtps_epi32(v), z);
        }
        /* int32 -> uint16 -> uint8 (every value is in [0, 255]); packus works within 128-bit lanes */
        const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xd8);
        _mm_storeu_si128((__m128i*)(q + i),
                         _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
    }
    for (; i < count; i++) {
        float f = x[i] / scale;
        if (!(f >= (float)-zero_point)) f = (float)-zero_point; /* NaN to the low end */
        if (f > (float)(255 - zero_point)) f = (float)(255 - zero_point);
        q[i] = (uint8_t)(_mm_cvtss_si32(_mm_set_ss(f)) + zero_point);
    }
}

/* Rows m, m + 1 (NM of them, 1 or 2) against one 16-column panel. AVX2 has no u8 x s8 product that is exact
 * for 8-bit weights (vpmaddubsw adds pairs in saturating int16: 255 * 127 * 2 > 32767), so both sides are
 * widened to int16 and vpmaddwd adds pairs of products in int32: each 16-byte quarter of a 64-byte group (4
 * columns x 4 k) gives two int32 halves per column, summed once at the end. */
static inline __attribute__((always_inline)) void panel_rows(const Job* j, int64_t m, int64_t p, const int NM) {
    const int64_t groups_k = j->k / 4;
    const int8_t* panel = j->w + p * groups_k * 64;
    __m256i acc[2][4];
    for (int r = 0; r < NM; r++)
        for (int q = 0; q < 4; q++) acc[r][q] = _mm256_setzero_si256();
    for (int64_t g = 0; g < groups_k; g++) {
        __m256i b[4];
        for (int q = 0; q < 4; q++) b[q] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(panel + g * 64 + 16 * q)));
        for (int r = 0; r < NM; r++) {
            int32_t four;
            memcpy(&four, j->xq + (m + r) * j->k + 4 * g, 4);
            const __m256i a = _mm256_cvtepu8_epi16(_mm_set1_epi32(four));
            for (int q = 0; q < 4; q++) acc[r][q] = _mm256_add_epi32(acc[r][q], _mm256_madd_epi16(b[q], a));
        }
    }
    const int64_t n0 = p * 16;
    const __m256i zero_point = _mm256_set1_epi32(j->x_zero_point);
    const __m256 x_scale = _mm256_set1_ps(j->x_scale);
    for (int h = 0; h < 2; h++) { /* columns 8h .. 8h + 7 */
        const __m256i correction = _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i*)(j->colsum + n0 + 8 * h)),
                                                      zero_point);
        const __m256 scale = _mm256_mul_ps(x_scale, _mm256_loadu_ps(j->w_scale + n0 + 8 * h));
        for (int r = 0; r < NM; r++) {
            /* hadd pairs the halves: columns 0, 1, 4, 5 | 2, 3, 6, 7 of the eight; the permute puts them in order */
            const __m256i sums = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][2 * h], acc[r][2 * h + 1]), 0xd8);
            const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, correction));
            _mm256_storeu_ps(j->y + (m + r) * j->n + n0 + 8 * h, _mm256_mul_ps(v, scale));
        }
    }
}

/* Rows m .. m + NM - 1 against one panel where every |W| <= 64 (7-bit weights, as `pipeline quantize` writes
 * them on x86 without VNNI): vpmaddubsw's pairs of u8 x s8 products stay within int16 (2 * 255 * 64 < 32767),
 * so each 32-byte half of a group (8 columns x 4 k) is one vpmaddubsw and one vpmaddwd: half the instructions
 * of the widened path, which prefill, bound by arithmetic, sees. */
static inline __attribute__((always_inline)) void panel_rows_narrow(const Job* j, int64_t m, int64_t p,
                                                                     const int NM) {
    const int64_t groups_k = j->k / 4;
    const int8_t* panel = j->w + p * groups_k * 64;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4][2];
    for (int r = 0; r < NM; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t g = 0; g < groups_k; g++) {
        const __m256i b0 = _mm256_loadu_si256((const __m256i*)(panel + g * 64));
        const __m256i b1 = _mm256_loadu_si256((const __m256i*)(panel + g * 64 + 32));
        for (int r = 0; r < NM; r++) {
            int32_t four;
            memcpy(&four, j->xq + (m + r) * j->k + 4 * g, 4);
            const __m256i a = _mm256_set1_epi32(four);
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b0), ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b1), ones));
        }
    }
    const int64_t n0 = p * 16;
    const __m256i zero_point = _mm256_set1_epi32(j->x_zero_point);
    const __m256 x_scale = _mm256_set1_ps(j->x_scale);
    for (int h = 0; h < 2; h++) {
        const __m256i correction = _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i*)(j->colsum + n0 + 8 * h)),
                                                      zero_point);
        const __m256 scale = _mm256_mul_ps(x_scale, _mm256_loadu_ps(j->w_scale + n0 + 8 * h));
        for (int r = 0; r < NM; r++)
            _mm256_storeu_ps(j->y + (m + r) * j->n + n0 + 8 * h,
                             _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][h], correction)), scale));
    }
}

/* NP panels x NM rows starting at (row m, panel p): a panel at a time; full 8-bit weights take rows in pairs
 * (16 vector registers). */
static inline __attribute__((always_inline)) void block(const Job* j, int64_t m, int64_t p, const int NP,
                                                         const int NM) {
    for (int c = 0; c < NP; c++) {
        if (j->narrow) {
            panel_rows_narrow(j, m, p + c, NM);
            continue;
        }
        int r = 0;
        for (; r + 2 <= NM; r += 2) panel_rows(j, m + r, p + c, 2);
        if (r < NM) panel_rows(j, m + r, p + c, 1);
    }
}
#else /* AArch64 */
/* The same QuantizeLinear, stored minus 128 as int8 for sdot: clamping with maxNum/minNum (vmaxnmq / fmaxf)
 * sends NaN to the low end as the x86 path does, and vcvtnq rounds half to even. */
static void quantize(const float* x, uint8_t* q, int64_t count, float scale, int32_t zero_point) {
    const float32x4_t s = vdupq_n_f32(scale), lo = vdupq_n_f32((float)-zero_point),
                      hi = vdupq_n_f32((float)(255 - zero_point));
    const int32x4_t z = vdupq_n_s32(zero_point - 128);
    int8_t* out = (int8_t*)q;
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
        int32x4_t r[4];
        for (int v = 0; v < 4; v++) {
            const float32x4_t f = vminnmq_f32(vmaxnmq_f32(vdivq_f32(vld1q_f32(x + i + 4 * v), s), lo), hi);
            r[v] = vaddq_s32(vcvtnq_s32_f32(f), z);
        }
        const int16x8_t h0 = vcombine_s16(vmovn_s32(r[0]), vmovn_s32(r[1]));
        const int16x8_t h1 = vcombine_s16(vmovn_s32(r[2]), vmovn_s32(r[3]));
        vst1q_s8(out + i, vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
    }
    for (; i < count; i++) {
        const float f = fminf(fmaxf(x[i] / scale, (float)-zero_point), (float)(255 - zero_point));
        out[i] = (int8_t)(vcvtns_s32_f32(f) + zero_point - 128);
    }
}

/* NP panels x NM rows starting at (row m, panel p), one panel at a time (16 accumulators of 4 columns for 4
 * rows: AArch64 has 32 vector registers). */
static inline __attribute__((always_inline)) void block(const Job* j, int64_t m, int64_t p, const int NP,
                                                         const int NM) {
    const int64_t groups_k = j->k / 4;
    const int32x4_t zero_point = vdupq_n_s32(j->x_zero_point - 128);
    const float32x4_t x_scale = vdupq_n_f32(j->x_scale);
    const int8_t* row[4];
    for (int r = 0; r < NM; r++) row[r] = (const int8_t*)j->xq + (m + r) * j->k;
    for (int c = 0; c < NP; c++) {
        const int8_t* panel = j->w + (p + c) * groups_k * 64;
        int32x4_t acc[4][4];
        for (int r = 0; r < NM; r++)
            for (int v = 0; v < 4; v++) acc[r][v] = vdupq_n_s32(0);
        for (int64_t g = 0; g < groups_k; g++) {
            int8x16_t b[4];
            for (int v = 0; v < 4; v++) b[v] = vld1q_s8(panel + g * 64 + 16 * v);
            for (int r = 0; r < NM; r++) {
                int32_t four;
                memcpy(&four, row[r] + 4 * g, 4);
                const int8x16_t a = vreinterpretq_s8_s32(vdupq_n_s32(four));
                for (int v = 0; v < 4; v++) acc[r][v] = vdotq_s32(acc[r][v], a, b[v]);
            }
        }
        const int64_t n0 = (p + c) * 16;
        for (int v = 0; v < 4; v++) {
            const int32x4_t correction = vmulq_s32(vld1q_s32(j->colsum + n0 + 4 * v), zero_point);
            const float32x4_t scale = vmulq_f32(x_scale, vld1q_f32(j->w_scale + n0 + 4 * v));
            for (int r = 0; r < NM; r++)
                vst1q_f32(j->y + (m + r) * j->n + n0 + 4 * v,
                          vmulq_f32(vcvtq_f32_s32(vsubq_s32(acc[r][v], correction)), scale));
        }
    }
}

#endif

static void run_chunk(void* data, size_t chunk) {
    const Job* j = (const Job*)data;
    const int64_t first = j->groups * (int64_t)chunk / j->chunks, last = j->groups * ((int64_t)chunk + 1) / j->chunks;
    for (int64_t g = first; g < last; g++) {
        const int64_t p = 4 * g;
        const int64_t np = j->panels - p < 4 ? j->panels - p : 4;
        int64_t m = 0;
        if (np == 4) {
            for (; m + 4 <= j->m; m += 4) block(j, m, p, 4, 4);
            for (; m < j->m; m++) block(j, m, p, 4, 1);
        } else {
            for (; m < j->m; m++) {
                if (np == 3) block(j, m, p, 3, 1);
                else if (np == 2) block(j, m, p, 2, 1);
                else block(j, m, p, 1, 1);
            }
        }
    }
}

enum { MAX_SEGMENTS = 64 };

/* Codes stored packed (BlockInt8MatMul's and BlockGather's attributes K, bits, rows): runs of rows[s] rows at
 * bits[s] bits, n rows and `bytes` packed bytes in all. */
typedef struct {
    size_t count;
    int64_t bits[MAX_SEGMENTS], rows[MAX_SEGMENTS];
    int64_t bytes;
} Segments;

/* What a kernel instance knows from its node: StaticInt8MatMul's `weight_max_abs` attribute (128 if absent);
 * BlockInt8MatMul's blocks when its codes are stored packed (below), unpacked once when the session starts (the
 * x86-64 builds' 5-bit runs into a layout of their own); BlockGather's segments; GluRotate's signs. */
typedef struct {
    int64_t weight_max_abs;
    uint8_t* blocks; /* (n, kb, 32), or NULL: the blocks are input 1 as stored */
    int64_t n, kb;
    Segments seg;
    /* where each segment's rows start in `blocks`, and the width its codes are kept at in memory: 5 (the x86-64
     * builds: "5-bit codes kept at 5 bits" below), 4 ("4-bit codes kept at 4 bits"), or 0: a byte each */
    int64_t offset[MAX_SEGMENTS];
    unsigned char kept[MAX_SEGMENTS];
    int any_kept;
    /* GluRotate: R's first column, (b), where R is diag(that column) times Sylvester's Hadamard matrix of
     * order b (the fast transform applies); else NULL */
    float* signs;
    int64_t signs_b;
    int gelu; /* GluRotate's activation: GELU's tanh form where 1, silu where 0 */
    /* CacheAttention's attributes */
    int64_t heads, kv_heads, window;
    float scale, softcap;
} Kernel;

static OrtStatus* shape_of(const OrtValue* value, int64_t* dims, size_t* rank) {
    OrtTensorTypeAndShapeInfo* info;
    RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(value, &info));
    OrtStatus* status = g_api->GetDimensionsCount(info, rank);
    if (!status && *rank > 8) status = g_api->CreateStatus(ORT_INVALID_ARGUMENT, "StaticInt8MatMul: rank > 8");
    if (!status) status = g_api->GetDimensions(info, dims, *rank);
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    return status;
}

static void* data_of(const OrtValue* value) {
    void* data = NULL;
    OrtStatus* status = g_api->GetTensorMutableData((OrtValue*)value, &data);
    if (status) {
        g_api->ReleaseStatus(status);
        return NULL;
    }
    return data;
}

/* The output: x's shape with its last dimension n; *m is the number of rows (the product of the others). */
static OrtStatus* output_rows(OrtKernelContext* context, const int64_t* x_dims, size_t x_rank, int64_t n, float** y,
                              int64_t* m) {
    int64_t y_dims[8];
    memcpy(y_dims, x_dims, sizeof(int64_t) * x_rank);
    y_dims[x_rank - 1] = n;
    *m = 1;
    for (size_t i = 0; i + 1 < x_rank; i++) *m *= x_dims[i];
    OrtValue* value;
    RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, y_dims, x_rank, &value));
    *y = (float*)data_of(value);
    return NULL;
}

static OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* context) {
    const OrtValue* in[6];
    for (size_t i = 0; i < 6; i++) RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &in[i]));
    int64_t x_dims[8], w_dims[8];
    size_t x_rank, w_rank;
    RETURN_IF_ERROR(shape_of(in[0], x_dims, &x_rank));
    RETURN_IF_ERROR(shape_of(in[1], w_dims, &w_rank));
    if (x_rank < 1 || w_rank != 3 || w_dims[2] != 64 || x_dims[x_rank - 1] != 4 * w_dims[1])
        return g_api->CreateStatus(ORT_INVALID_ARGUMENT,
                                   "StaticInt8MatMul: x (..., K) needs w_packed (N/16, K/4, 64)");
    Job job;
    job.k = x_dims[x_rank - 1];
    job.panels = w_dims[0];
    job.n = 16 * job.panels;
    RETURN_IF_ERROR(output_rows(context, x_dims, x_rank, job.n, &job.y, &job.m));
    const float* x = (const float*)data_of(in[0]);
    job.w = (const int8_t*)data_of(in[1]);
    job.w_scale = (const float*)data_of(in[2]);
    job.colsum = (const int32_t*)data_of(in[3]);
    const float* x_scale = (const float*)data_of(in[4]);
    const uint8_t* x_zero_point = (const uint8_t*)data_of(in[5]);
    if (job.m == 0) return NULL;
    if (!job.y || !x || !job.w || !job.w_scale || !job.colsum || !x_scale || !x_zero_point)
        return g_api->CreateStatus(ORT_FAIL, "StaticInt8MatMul: an input has no data");
    job.x_scale = *x_scale;
    job.x_zero_point = *x_zero_point;
    job.narrow = ((const Kernel*)kernel)->weight_max_abs <= 64;
    uint8_t* xq = (uint8_t*)malloc((size_t)(job.m * job.k));
    if (!xq) return g_api->CreateStatus(ORT_FAIL, "StaticInt8MatMul: out of memory");
    quantize(x, xq, job.m * job.k, job.x_scale, job.x_zero_point);
    job.xq = xq;
    job.groups = (job.panels + 3) / 4;
    job.chunks = job.groups < 16 ? job.groups : 16; /* a few per thread: even finish times */
    OrtStatus* status = g_api->KernelContext_ParallelFor(context, run_chunk, (size_t)job.chunks, 0, &job);
    free(xq);
    return status;
}


/* ---- BlockInt8MatMul --------------------------------------------------------------------------------------
 *
 *   y[n] = sum over blocks b of  w_scale[n, b] * a_scale[b] * sum_i (W[n, b, i] - 128) * A[b, i]
 *
 * where W holds com.microsoft.MatMulNBits' 8-bit blocks of 32 as they are stored (N, K/32, 32; zero point 128)
 * and A, a_scale are the activations quantized per block of 32 as onnxruntime's MatMulNBits does at
 * accuracy_level 4 (MLAS' int8 path): a_scale = amax / 127, A = round_half_even(x * (127 / amax)). The integer
 * sums are the ones MatMulNBits forms; only the float sum over blocks is taken in another order.
 *
 * Why it exists: MatMulNBits prepacks its weight into a copy of its own when the session starts, and frees the
 * stored blocks only when nothing else reads them. A tied head whose blocks the token embedding also gathers
 * (exporters/quantization/embedding.py) is then held twice: for Gemma 3's 262,144 x 640 head, 220 MB alone
 * and 388 MB with the Gather. This op reads the stored blocks in place, so the table is in memory once: that
 * head with its Gather peaks at 245 MB (against 463 with MatMulNBits, on this 2-core EPYC) and one row takes
 * 3.7-4.7 ms on 2 threads (MatMulNBits on its prepacked copy: 4.2-4.9; see block_row).
 *
 * Inputs: 0 x float (..., K); 1 blocks uint8 (N, K/32, 32); 2 scales float (N, K/32), or flat (N * K/32);
 * 3 (optional) offsets float (N, K/32): y[n] gains sum over blocks b of offset[n, b] * (the float sum of x over
 * block b), the per-block minimum of a GGUF's Q4_1 / Q4_K / Q5_1 / Q5_K weights (w = scale * q + minimum),
 * which the gguf recipe otherwise adds as a ReduceSum and a float MatMul beside MatMulNBits
 * (exporters/quantization/grid.py; exporters/block_kernels.py `fold_offsets`).
 * Output: y float (..., N). Work is split over row ranges of N on onnxruntime's intra-op thread pool.
 *
 * Packed codes (attributes K, bits, rows): blocks whose values W - 128 all lie in [-2^(b-1), 2^(b-1)) are
 * stored at b bits, as a GGUF's Q5_0 blocks are 5-bit (exporters/block_kernels.py `pack_narrow_blocks`). Input
 * 1 is then a flat initializer: for each segment s of rows[s] rows, each row's K/32 blocks, each block 32 codes
 * c = W - 128 + 2^(b-1) in 4b bytes, a little-endian bit stream (code i at bits [i*b, i*b + b)), b = bits[s].
 * The kernel unpacks them into the (N, K/32, 32) bytes above once, when the session is created, and computes
 * exactly as for stored 8-bit blocks: the file holds b bits a weight, memory 8 (the packed codes' pages are
 * handed back to the system once read, release_pages). The x86-64 builds keep 5-bit runs at 5 bits in memory
 * instead, and every build 4-bit runs at 4 bits (w4's 4-bit MatMulNBits, whose stored nibbles are such a run as
 * they are), decoding them as they read them (below, "5-bit codes kept at 5 bits", "4-bit codes kept at 4 bits").
 *
 * x86-64: vpdpbusd takes 64 stored bytes (two blocks) as its unsigned operand and A as its signed one; each
 * lane's accumulator starts at -128 times the sum of its own 4 activations (the zero point), so every lane is the
 * exact partial sum of (W - 128) * A over its 4 weights, an integer that converts to float exactly and is as small
 * as the weights are narrow. (Starting every lane at -16 * sum(A of the block), which sums to the same over a
 * block's 8 lanes, left each lane about 128 * A large until the block's lanes were added: its float products then
 * rounded as 8-bit weights' do, 3e-5 on outputs of 10 for 4-bit codes where onnxruntime rounds 3e-6.) AArch64: the
 * stored bytes xor 0x80 are W - 128 as int8, which sdot takes as is.
 */
enum { BLOCK = 32 };

/* ---- 5-bit codes kept at 5 bits (the x86-64 builds) ----
 *
 * A one-row product (a decode step) streams its weights from memory, and 5-bit codes are 20 bytes a block where
 * unpacked bytes take 32. So a run of 5-bit codes (w4's --w4-high-bits 5, a GGUF's Q5_0) stays 5 bits a weight in
 * memory and is decoded as a decode step reads it. A code c stands for the weight c - 16 (W = c + 112 as a stored
 * byte). Each build keeps a row in the order its decode reads it:
 *
 * - AVX2: groups of 8 blocks (fewer at the row's end): each block's 16 bytes of low nibbles (byte i: code i in
 *   bits 0-3, code i + 16 in bits 4-7), then 32 bytes of fifth bits (byte i, bit t: code i of the group's block t).
 * - AVX-512: pairs of blocks t, t + 1 (the last alone where the row has an odd count), 40 bytes each: 32 bytes of
 *   nibbles (byte i: code i of block t in bits 0-3, of block t + 1 in bits 4-7), then the pair's 64 fifth bits as
 *   a little-endian word (bit i: code i of block t, bit 32 + i: of block t + 1), the byte mask that adds 16.
 *
 * Each build's decode row gives the same int32 lanes as its 8-bit path on the bytes W, summed in the same order,
 * so the same floats to the bit; a prompt's rows are decoded to bytes a few at a time and go the 8-bit way. On
 * the AVX2 build (a 2-core EPYC without VNNI), SmolLM2's w4-native with 109 5-bit MatMuls decodes 11% faster
 * and holds 29 MB less (docs/benchmarks.md); on the AVX-512 build (a 2-core EPYC with VNNI), with 103, 9.0 ->
 * 8.2 ms/token and 223 -> 197 MB (python -m runtimes bench, 3 alternating runs each). */
#if KERNEL_FIVE
/* a prompt's 5-bit (and 4-bit) rows are decoded this many at a time: the weight rows the build's prompt tile takes */
enum { KEPT_ROWS = KERNEL_AVX512 ? 4 : 2 };

#if KERNEL_AVX512
enum { FIVE_PAIR = 40 };

static int64_t five_row_bytes(int64_t kb) { return (kb + 1) / 2 * FIVE_PAIR; }

/* One row of bytes W = c + 112 (kb blocks) -> the 5-bit layout above. */
static void five_pack_row(const uint8_t* w, int64_t kb, uint8_t* out) {
    for (int64_t t = 0; t < kb; t += 2, out += FIVE_PAIR) {
        uint64_t fifth = 0;
        memset(out, 0, 32);
        for (int64_t h = 0; h < 2 && t + h < kb; h++)
            for (int i = 0; i < BLOCK; i++) {
                const int c = w[(t + h) * BLOCK + i] - 112;
                out[i] |= (uint8_t)((c & 15) << (4 * h));
                fifth |= (uint64_t)((c >> 4) & 1) << (32 * h + i);
            }
        for (int i = 0; i < 8; i++) out[32 + i] = (uint8_t)(fifth >> (8 * i));
    }
}
#else
enum { FIVE_GROUP = 8 };

static int64_t five_row_bytes(int64_t kb) { return kb * 16 + (kb + FIVE_GROUP - 1) / FIVE_GROUP * 32; }

/* One row of bytes W = c + 112 (kb blocks) -> the 5-bit layout above. */
static void five_pack_row(const uint8_t* w, int64_t kb, uint8_t* out) {
    for (int64_t g = 0; g < kb; g += FIVE_GROUP) {
        const int64_t nb = kb - g < FIVE_GROUP ? kb - g : FIVE_GROUP;
        uint8_t* plane = out + nb * 16;
        memset(plane, 0, 32);
        for (int64_t t = 0; t < nb; t++) {
            const uint8_t* c = w + (g + t) * BLOCK;
            for (int i = 0; i < 16; i++)
                out[t * 16 + i] = (uint8_t)(((c[i] - 112) & 15) | (((c[i + 16] - 112) & 15) << 4));
            for (int i = 0; i < BLOCK; i++) plane[i] |= (uint8_t)((((c[i] - 112) >> 4) & 1) << t);
        }
        out += nb * 16 + 32;
    }
}
#endif
#endif

/* ---- 4-bit codes kept at 4 bits (every build) ----
 *
 * w4's 4-bit MatMulNBits (symmetric blocks of 32, w = scale * (q - 8)) become runs of 4-bit codes c = q, the
 * weight c - 8 (W = c + 120 as a stored byte), and every build keeps them at 4 bits in memory, decoding them as a
 * row is read, as the 5-bit runs above: 16 bytes a block where bytes take 32. A row's layout:
 *
 * - AVX-512: pairs of blocks t, t + 1 (the last alone where the row has an odd count), 32 bytes each: byte i holds
 *   code i of block t in bits 0-3 and of block t + 1 in bits 4-7 (the 5-bit pairs without their fifth-bit word).
 * - AVX2 and AArch64: 16 bytes a block: byte i holds code i in bits 0-3 and code i + 16 in bits 4-7.
 *
 * Each build's rows give the same int32 sums as its 8-bit path on the bytes W, so the same floats to the bit. */
#if KERNEL_AVX512
enum { FOUR_PAIR = 32 };

static int64_t four_row_bytes(int64_t kb) { return (kb + 1) / 2 * FOUR_PAIR; }

/* One row of bytes W = c + 120 (kb blocks) -> the 4-bit layout above. */
static void four_pack_row(const uint8_t* w, int64_t kb, uint8_t* out) {
    for (int64_t t = 0; t < kb; t += 2, out += FOUR_PAIR)
        for (int i = 0; i < BLOCK; i++)
            out[i] = (uint8_t)(((w[t * BLOCK + i] - 120) & 15)
                               | (t + 1 < kb ? ((w[(t + 1) * BLOCK + i] - 120) & 15) << 4 : 0));
}
#else
static int64_t four_row_bytes(int64_t kb) { return kb * 16; }

/* One row of bytes W = c + 120 (kb blocks) -> the 4-bit layout above. */
static void four_pack_row(const uint8_t* w, int64_t kb, uint8_t* out) {
    for (int64_t t = 0; t < kb; t++, w += BLOCK)
        for (int i = 0; i < 16; i++) *out++ = (uint8_t)(((w[i] - 120) & 15) | (((w[i + 16] - 120) & 15) << 4));
}
#endif

/* The bytes a row of a segment kept at `width` bits (4 or 5) takes in memory. */
static int64_t kept_row_bytes(int width, int64_t kb) {
#if KERNEL_FIVE
    if (width == 5) return five_row_bytes(kb);
#endif
    return width == 4 ? four_row_bytes(kb) : kb * BLOCK;
}

typedef struct {
    const int8_t* aq;       /* (M, K) activations quantized per block */
    const float* a_scale;   /* (M, KB) */
#if KERNEL_AVX512
    const int32_t* a_corr;  /* (M, ceil(KB/2), 16): each pair of blocks' accumulator starts, -128 * each lane's
                             * 4 activations summed */
#endif
    const uint8_t* w;       /* (N, KB, 32) */
    const float* w_scale;   /* (N, KB) */
    const float* offset;    /* (N, KB): each block's offset term, or NULL */
    const float* x_sum;     /* (M, KB): the float sum of each block of x, with `offset` */
    float* y;               /* (M, N) */
    int64_t m, kb, n, chunks;
    const Kernel* packed;   /* with segments kept narrow (any_kept), the rows as it keeps them; else NULL */
#if KERNEL_FIVE
    uint8_t* scratch;       /* (chunks, KEPT_ROWS, K): a prompt's narrow rows, a few at a time, a byte each */
#endif
#if KERNEL_AVX2
    const int16_t* a_pair16; /* (M, KB, 16): 16 * (A[2i] + A[2i + 1]) of each block, for the narrow rows */
#endif
} BlockJob;

#if KERNEL_AVX512
static void block_quantize(const float* x, int64_t m, int64_t kb, int8_t* aq, float* a_scale, int32_t* a_corr) {
    const int64_t pairs = (kb + 1) / 2;
    for (int64_t r = 0; r < m; r++)
        for (int64_t b = 0; b < kb; b++) {
            const float* v = x + (r * kb + b) * BLOCK;
            const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const __m512 inverse = _mm512_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
            const __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, inverse),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, inverse),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            int8_t* out = aq + (r * kb + b) * BLOCK;
            _mm_storeu_si128((__m128i*)out, _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128((__m128i*)(out + 16), _mm512_cvtsepi32_epi8(q1));
            a_scale[r * kb + b] = amax / 127.0f;
            const int64_t lane = (r * pairs + b / 2) * 16 + (b % 2) * 8;
            for (int i = 0; i < 8; i++) /* each lane's own zero point: its 4 activations times -128 */
                a_corr[lane + i] = -128 * (out[4 * i] + out[4 * i + 1] + out[4 * i + 2] + out[4 * i + 3]);
        }
    if (kb % 2) /* the last pair's second half: no block, nothing added */
        for (int64_t r = 0; r < m; r++)
            for (int i = 8; i < 16; i++) a_corr[(r * pairs + pairs - 1) * 16 + i] = 0;
}

/* Lanes 0-7 from scale 2(p % 8) of a 16-scale vector, lanes 8-15 from the next: pair p's two blocks. A load
 * from this table, where building the vector took three operations a pair. */
static const int32_t PAIR_INDEX[8][16] __attribute__((aligned(64))) = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
    {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},
    {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},
    {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13},
    {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15}};

static inline __m512i pair_index(int64_t p) { return _mm512_load_si512(PAIR_INDEX[p % 8]); }

/* Pair p of one weight row: its 64 (or, for the last block of an odd count, 32) stored bytes against the
 * activations a, scaled by the row's scale products (w_scale * a_scale, 16 blocks a vector) and added to acc.
 * Byte-masked loads are slow on some x86 cores (AMD Zen 4): the single block is a 256-bit load instead. The
 * bytes `ahead` of w are asked for explicitly: the hardware prefetcher alone follows these streams poorly. */
static inline __attribute__((always_inline)) __m512 pair_step(__m512 acc, const uint8_t* w, int two, __m512i start,
                                                               __m512i a, __m512i index, __m512 scales,
                                                               int64_t ahead) {
    _mm_prefetch((const char*)w + ahead, _MM_HINT_NTA);
    const __m512i b = two ? _mm512_loadu_si512(w) : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)w));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, b, a)),
                           _mm512_permutexvar_ps(index, scales), acc);
}

/* NR consecutive weight rows from row n (its bytes at w), for activation row r: NR independent accumulators,
 * each pair of blocks' activations loaded once for all of them. For several activation rows (a prompt's logits),
 * where the weight rows are read from cache once per activation row after the first. Four rows side by side are
 * four streams: each asks for the bytes 5120 ahead of its own (on this 2-core EPYC, one thread: 11.4 -> 7.4 ms
 * for a 262,144 x 640 head). */
static inline __attribute__((always_inline)) void block_rows(const BlockJob* j, const uint8_t* w, int64_t n, int64_t r,
                                                             const int NR) {
    const int64_t kb = j->kb, k = kb * BLOCK, pairs = (kb + 1) / 2;
    const int8_t* ar = j->aq + r * k;
    const int32_t* corr = j->a_corr + r * pairs * 16;
    const float* as = j->a_scale + r * kb;
    __m512 acc[4], scales[4];
    for (int i = 0; i < NR; i++) acc[i] = scales[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        if (p % 8 == 0) { /* the next 16 blocks' scale products of each row (fewer at the row's end) */
            const int64_t left = kb - 2 * p;
            const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            const __m512 a_scale = _mm512_maskz_loadu_ps(mask, as + 2 * p);
            for (int i = 0; i < NR; i++)
                scales[i] = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, j->w_scale + (n + i) * kb + 2 * p), a_scale);
        }
        const int two = 2 * p + 1 < kb;
        const __m512i a = two ? _mm512_loadu_si512(ar + 64 * p)
                              : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(ar + 64 * p)));
        const __m512i start = _mm512_loadu_si512(corr + 16 * p), index = pair_index(p);
        for (int i = 0; i < NR; i++)
            acc[i] = pair_step(acc[i], w + i * k + 64 * p, two, start, a, index, scales[i], 5120);
    }
    for (int i = 0; i < NR; i++) j->y[r * j->n + n + i] = _mm512_reduce_add_ps(acc[i]);
}

/* How far ahead of a decode step's reading its weight bytes are asked for. One core alone draws about 12 GB/s
 * from memory on the 2-core VNNI EPYC, limited by the misses it keeps in flight: 4096 bytes ahead against 1024
 * took SmolLM2 w4-native's 122 weight MatMuls from 10.9 to 8.9 ms on one thread and 6.2 to 5.7 ms on two
 * (a graph of those MatMuls alone, 3 alternating rounds; 2048 and 8192 no better, nor prefetching to L1 or L2). */
enum { DECODE_AHEAD = 4096 };

/* Weight row n (its bytes at w) for the one activation row of a decode step: the rows are read in order, one
 * stream, each pair DECODE_AHEAD bytes ahead asked for, with two accumulators (even and odd pairs) for the sums'
 * latency.
 * Four rows side by side (block_rows) reach half the memory bandwidth once rows are long: on this 2-core EPYC, 2
 * threads, Llama-3.2-1B's 128,256 x 2048 head took 11.5 ms that way and takes 6.3-7.1 ms so (Gemma 3's 262,144 x
 * 640: 4.2 -> 3.7-4.4 ms). */
static inline __attribute__((always_inline)) void block_row(const BlockJob* j, const uint8_t* w, int64_t n) {
    const int64_t kb = j->kb, pairs = (kb + 1) / 2;
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, scales = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p += 2) {
        if (p % 8 == 0) { /* the next 16 blocks' scale products */
            const int64_t left = kb - 2 * p;
            const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            scales = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, j->w_scale + n * kb + 2 * p),
                                   _mm512_maskz_loadu_ps(mask, j->a_scale + 2 * p));
        }
        for (int h = 0; h < 2 && p + h < pairs; h++) {
            const int64_t q = p + h;
            const int two = 2 * q + 1 < kb;
            const __m512i a = two ? _mm512_loadu_si512(j->aq + 64 * q)
                                  : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(j->aq + 64 * q)));
            acc[h] = pair_step(acc[h], w + 64 * q, two, _mm512_loadu_si512(j->a_corr + 16 * q), a, pair_index(q),
                               scales, DECODE_AHEAD);
        }
    }
    j->y[n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
}

/* Rows [lo, hi) whose bytes are a byte each, row n's at w + (n - from) * K. */
static void byte_rows(const BlockJob* j, const uint8_t* w, int64_t from, int64_t lo, int64_t hi) {
    const int64_t k = j->kb * BLOCK;
    int64_t n = lo;
    if (j->m == 1) {
        for (; n < hi; n++) block_row(j, w + (n - from) * k, n);
        return;
    }
    for (; n + 4 <= hi; n += 4)
        for (int64_t r = 0; r < j->m; r++) block_rows(j, w + (n - from) * k, n, r, 4);
    for (; n < hi; n++)
        for (int64_t r = 0; r < j->m; r++) block_rows(j, w + (n - from) * k, n, r, 1);
}

/* 5-bit codes on this build: vpdpbusd takes the stored bytes W as they are, so a pair of blocks is decoded to
 * its 64 bytes W = c + 112 and goes pair_step's way, with the same accumulator starts: the 32 nibble bytes in both
 * halves, the high half's shifted down by 4, their low nibbles with 112 added (or'd: 112 has no bit below 4), and
 * 16 more in the bytes the pair's fifth-bit word selects. Three vector operations a pair, against seven when the
 * fifth bits were a byte plane to test and the nibbles' halves needed a shuffle: SmolLM2's w4-native decodes
 * 5% faster (7.36 -> 7.01 ms/token, medians of 8 alternating `python -m runtimes bench` processes a library). */
static inline __attribute__((always_inline)) __m512i five_pair(const uint8_t* pair) {
    uint64_t fifth;
    memcpy(&fifth, pair + 32, 8);
    const __m512i n = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)pair));
    const __m512i v = _mm512_mask_srli_epi16(n, (__mmask32)0xffff0000u, n, 4);
    const __m512i w = _mm512_ternarylogic_epi32(v, _mm512_set1_epi8(0x0f), _mm512_set1_epi8(112), 0xea);
    return _mm512_mask_add_epi8(w, _cvtu64_mask64(fifth), w, _mm512_set1_epi8(16));
}

/* 4-bit codes on this build: a pair of blocks decoded to its 64 bytes W = c + 120 as five_pair does, without the
 * fifth bits (two vector operations), so the same accumulator starts and int32 lanes as pair_step on W. */
static inline __attribute__((always_inline)) __m512i four_pair(const uint8_t* pair) {
    const __m512i n = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)pair));
    const __m512i v = _mm512_mask_srli_epi16(n, (__mmask32)0xffff0000u, n, 4);
    return _mm512_add_epi8(_mm512_and_si512(v, _mm512_set1_epi8(0x0f)), _mm512_set1_epi8(120));
}

/* Row n of a run kept at `width` bits (5 or 4; its layout at wr) against a decode step's one activation row:
 * block_row's sums on its bytes, in the same order. (Two or four rows side by side, sharing each pair's
 * activation loads, were slower.) */
static inline __attribute__((always_inline)) void kept_row(const BlockJob* j, const uint8_t* wr, int64_t n,
                                                            const int width) {
    const int64_t kb = j->kb, pairs = (kb + 1) / 2, pair_bytes = width == 5 ? FIVE_PAIR : FOUR_PAIR;
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, scales = _mm512_setzero_ps();
    /* even and odd pairs into acc[0] and acc[1], an unrolled h: indexed by q % 2, the accumulators lived on the
     * stack, each pair's multiply-add waiting on the last one's store (perf over SmolLM2's Q4_1 gguf-native decode:
     * 9% of the row loop's samples on that store; w4-native's 5-bit MatMuls 10-30% faster without it, per op in
     * onnxruntime's profiler) */
    for (int64_t p = 0; p < pairs; p += 2) {
        if (p % 8 == 0) { /* the next 16 blocks' scale products */
            const int64_t left = kb - 2 * p;
            const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            scales = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, j->w_scale + n * kb + 2 * p),
                                   _mm512_maskz_loadu_ps(mask, j->a_scale + 2 * p));
            for (int l = 0; l < pair_bytes / 8; l++) /* the next 8 pairs' bytes */
                _mm_prefetch((const char*)wr + pair_bytes * p + DECODE_AHEAD + 64 * l, _MM_HINT_NTA);
        }
        for (int h = 0; h < 2 && p + h < pairs; h++) {
            const int64_t q = p + h;
            const int two = 2 * q + 1 < kb;
            const __m512i a = two ? _mm512_loadu_si512(j->aq + 64 * q)
                                  : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(j->aq + 64 * q)));
            const __m512i w = width == 5 ? five_pair(wr + FIVE_PAIR * q) : four_pair(wr + FOUR_PAIR * q);
            const __m512i sums = _mm512_dpbusd_epi32(_mm512_loadu_si512(j->a_corr + 16 * q), w, a);
            acc[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_permutexvar_ps(pair_index(q), scales), acc[h]);
        }
    }
    j->y[n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
}

/* A row kept at `width` bits (wr) -> its bytes W (kb blocks), for a prompt's rows. */
static void kept_unpack_row(const uint8_t* wr, int64_t kb, uint8_t* w, int width) {
    const int64_t pair_bytes = width == 5 ? FIVE_PAIR : FOUR_PAIR;
    for (int64_t t = 0; t < kb; t += 2, wr += pair_bytes) {
        const __m512i pair = width == 5 ? five_pair(wr) : four_pair(wr);
        if (t + 1 < kb)
            _mm512_storeu_si512(w + t * BLOCK, pair);
        else
            _mm256_storeu_si256((__m256i*)(w + t * BLOCK), _mm512_castsi512_si256(pair));
    }
}

#elif KERNEL_AVX2
static void block_quantize(const float* x, int64_t m, int64_t kb, int8_t* aq, float* a_scale) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < m * kb; i++) {
        const float* v = x + i * BLOCK;
        __m256 f[4], amax8 = _mm256_setzero_ps();
        for (int q = 0; q < 4; q++) {
            f[q] = _mm256_loadu_ps(v + 8 * q);
            amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, f[q]));
        }
        __m128 amax4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
        amax4 = _mm_max_ps(amax4, _mm_movehl_ps(amax4, amax4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(amax4, _mm_movehdup_ps(amax4)));
        const __m256 inverse = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        __m256i r[4];
        for (int q = 0; q < 4; q++) r[q] = _mm256_cvtps_epi32(_mm256_mul_ps(f[q], inverse));
        /* int32 -> int16 -> int8 with saturation, within 128-bit lanes: the permute restores the order */
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
        _mm256_storeu_si256((__m256i*)(aq + i * BLOCK),
                            _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        a_scale[i] = amax / 127.0f;
    }
}

/* One block's exact integer dot product, sum (W - 128) * A, as 8 int32 lanes. The stored bytes xor 0x80 are
 * W - 128 as int8 (-128 .. 127); vpmaddubsw takes their magnitudes (0 .. 128, unsigned) against A with their
 * signs (|A| <= 127), so each pair of products is at most 2 * 128 * 127 < 32767 and no int16 saturates. */
static inline __m256i block_dot(const uint8_t* w, const int8_t* a) {
    const __m256i signed_w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)w), _mm256_set1_epi8((char)0x80));
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(signed_w),
                                               _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)a), signed_w));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Weight row n, whose bytes are wr, against activation row r: two accumulators for the sums' latency, the bytes
 * 1 kB ahead asked for, as the AVX-512 path's decode row does. */
static inline void block_1x1(const BlockJob* j, const uint8_t* wr, int64_t n, int64_t r) {
    const int64_t kb = j->kb, k = kb * BLOCK;
    const float* sr = j->w_scale + n * kb;
    const int8_t* ar = j->aq + r * k;
    const float* as = j->a_scale + r * kb;
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b0 = 0; b0 < kb; b0 += 2) /* h unrolled: acc in registers (kept_row on AVX-512 says why) */
        for (int h = 0; h < 2 && b0 + h < kb; h++) {
            const int64_t b = b0 + h;
            _mm_prefetch((const char*)wr + b * BLOCK + 1024, _MM_HINT_NTA);
            acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(wr + b * BLOCK, ar + b * BLOCK)),
                                     _mm256_set1_ps(sr[b] * as[b]), acc[h]);
        }
    j->y[r * j->n + n] = hsum(_mm256_add_ps(acc[0], acc[1]));
}

/* Weight rows n, n + 1 (bytes w0, then the next row's) against activation rows r, r + 1: each block's four
 * loads and the weights' sign work shared by four products (block_dot's arithmetic). */
static inline void block_2x2(const BlockJob* j, const uint8_t* w0, int64_t n, int64_t r) {
    const int64_t kb = j->kb, k = kb * BLOCK;
    const uint8_t* w1 = w0 + k;
    const int8_t *a0 = j->aq + r * k, *a1 = a0 + k;
    const float *s0 = j->w_scale + n * kb, *s1 = s0 + kb, *t0 = j->a_scale + r * kb, *t1 = t0 + kb;
    const __m256i bias = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256 acc00 = _mm256_setzero_ps(), acc01 = _mm256_setzero_ps(), acc10 = _mm256_setzero_ps(),
           acc11 = _mm256_setzero_ps();
    for (int64_t b = 0; b < kb; b++) {
        const int64_t o = b * BLOCK;
        const __m256i v0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w0 + o)), bias);
        const __m256i v1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w1 + o)), bias);
        const __m256i u0 = _mm256_abs_epi8(v0), u1 = _mm256_abs_epi8(v1);
        const __m256i x0 = _mm256_loadu_si256((const __m256i*)(a0 + o));
        const __m256i x1 = _mm256_loadu_si256((const __m256i*)(a1 + o));
        const __m256i d00 = _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(x0, v0)), ones);
        const __m256i d01 = _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(x1, v0)), ones);
        const __m256i d10 = _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(x0, v1)), ones);
        const __m256i d11 = _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(x1, v1)), ones);
        acc00 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d00), _mm256_set1_ps(s0[b] * t0[b]), acc00);
        acc01 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d01), _mm256_set1_ps(s0[b] * t1[b]), acc01);
        acc10 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d10), _mm256_set1_ps(s1[b] * t0[b]), acc10);
        acc11 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d11), _mm256_set1_ps(s1[b] * t1[b]), acc11);
    }
    j->y[r * j->n + n] = hsum(acc00);
    j->y[(r + 1) * j->n + n] = hsum(acc01);
    j->y[r * j->n + n + 1] = hsum(acc10);
    j->y[(r + 1) * j->n + n + 1] = hsum(acc11);
}

enum { ROW_TILE = 64 }; /* a prompt's activation rows per pass over a chunk's weight rows: 64 x K bytes */

/* Rows [lo, hi) whose bytes are a byte each, row n's at w + (n - from) * K. A decode step's one activation row:
 * the weight rows in order, one stream. A prompt's: ROW_TILE activation rows at a time (they stay in cache while
 * the chunk's weight rows stream past), two weight rows by two. */
static void byte_rows(const BlockJob* j, const uint8_t* w, int64_t from, int64_t lo, int64_t hi) {
    const int64_t k = j->kb * BLOCK;
    if (j->m == 1) {
        for (int64_t n = lo; n < hi; n++) block_1x1(j, w + (n - from) * k, n, 0);
        return;
    }
    for (int64_t r0 = 0; r0 < j->m; r0 += ROW_TILE) {
        const int64_t r1 = r0 + ROW_TILE < j->m ? r0 + ROW_TILE : j->m;
        int64_t n = lo;
        for (; n + 2 <= hi; n += 2) {
            int64_t r = r0;
            for (; r + 2 <= r1; r += 2) block_2x2(j, w + (n - from) * k, n, r);
            for (; r < r1; r++) {
                block_1x1(j, w + (n - from) * k, n, r);
                block_1x1(j, w + (n + 1 - from) * k, n + 1, r);
            }
        }
        for (; n < hi; n++)
            for (int64_t r = r0; r < r1; r++) block_1x1(j, w + (n - from) * k, n, r);
    }
}

/* 5-bit codes on this build: on AVX2 without VNNI a one-row product of 8-bit blocks is bound by its arithmetic
 * about as much as by memory, and 5-bit codes need fewer instructions a block than 8-bit ones (no sign work: the
 * codes are small and unsigned), decoding included. vpmaddubsw takes c (0 .. 31, unsigned) against A, and each
 * pair's 16 * (A + A') is taken off (a_pair16), so every int32 lane is the one block_dot computes on W. A prompt's
 * rows are decoded to bytes two at a time. */

/* A block's 16 bytes of nibbles (byte i: code i in bits 0-3, code i + 16 in bits 4-7) -> its 32 nibbles in order,
 * a byte each. */
static inline __attribute__((always_inline)) __m256i nibbles_of(const uint8_t* nibbles) {
    const __m128i n = _mm_loadu_si128((const __m128i*)nibbles);
    return _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(n), _mm_srli_epi16(n, 4), 1),
                            _mm256_set1_epi8(0x0f));
}

/* Block t of a group: its 32 codes (0 .. 31) from its nibbles and the group's fifth bits. The shifts move bit t
 * of each byte to bit 4 within 16-bit lanes; what crosses into a neighbouring byte lands outside bit 4. */
static inline __attribute__((always_inline)) __m256i five_codes(const uint8_t* nibbles, __m256i plane, int t) {
    const __m256i low = nibbles_of(nibbles);
    const __m256i fifth = t < 4 ? _mm256_slli_epi16(plane, 4 - t) : _mm256_srli_epi16(plane, t - 4);
    return _mm256_or_si256(low, _mm256_and_si256(fifth, _mm256_set1_epi8(0x10)));
}

/* Each block's 16 * (A[2i] + A[2i + 1]), i = 0 .. 15: what the codes' offset of 16 adds to vpmaddubsw's pairs. */
static void five_pair_sums(const int8_t* aq, size_t blocks, int16_t* out) {
    const __m256i sixteen = _mm256_set1_epi8(16);
    for (size_t b = 0; b < blocks; b++)
        _mm256_storeu_si256((__m256i*)(out + b * 16),
                            _mm256_maddubs_epi16(sixteen, _mm256_loadu_si256((const __m256i*)(aq + b * BLOCK))));
}

/* Block b = g + t of 5-bit row wr (group g at gr) against activation row 0, into acc[b % 2] as block_1x1 does:
 * acc[t % 2], the same since g is a multiple of 8, and a constant index where t is (the group's unrolled steps),
 * so the accumulators stay in registers. */
#define FIVE_STEP(t)                                                                                              \
    do {                                                                                                          \
        const int64_t b = g + (t);                                                                                \
        const __m256i pairs = _mm256_sub_epi16(                                                                   \
            _mm256_maddubs_epi16(five_codes(gr + 16 * (t), plane, (t)),                                           \
                                 _mm256_loadu_si256((const __m256i*)(j->aq + b * BLOCK))),                        \
            _mm256_loadu_si256((const __m256i*)(j->a_pair16 + b * 16)));                                          \
        acc[(t) % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)),                        \
                                       _mm256_set1_ps(sr[b] * j->a_scale[b]), acc[(t) % 2]);                      \
    } while (0)

/* 5-bit row n (its layout at wr) against a decode step's one activation row: the same sums as block_1x1 on its
 * bytes, in the same order. */
static inline void five_row(const BlockJob* j, const uint8_t* wr, int64_t n) {
    const int64_t kb = j->kb;
    const float* sr = j->w_scale + n * kb;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t g = 0;
    for (; g + FIVE_GROUP <= kb; g += FIVE_GROUP, wr += FIVE_GROUP * 16 + 32) {
        const uint8_t* gr = wr;
        for (int l = 0; l < 3; l++) _mm_prefetch((const char*)gr + 1024 + 64 * l, _MM_HINT_NTA);
        const __m256i plane = _mm256_loadu_si256((const __m256i*)(gr + FIVE_GROUP * 16));
        FIVE_STEP(0); FIVE_STEP(1); FIVE_STEP(2); FIVE_STEP(3);
        FIVE_STEP(4); FIVE_STEP(5); FIVE_STEP(6); FIVE_STEP(7);
    }
    if (g < kb) { /* the row's last blocks, fewer than a group */
        const uint8_t* gr = wr;
        const __m256i plane = _mm256_loadu_si256((const __m256i*)(gr + (kb - g) * 16));
        for (int t = 0; t < kb - g; t++) FIVE_STEP(t);
    }
    j->y[n] = hsum(_mm256_add_ps(acc[0], acc[1]));
}

/* 4-bit row n (its layout at wr) against a decode step's one activation row: a 4-bit code c is the 5-bit code
 * c + 8 (the same weight, c - 8), which goes five_row's way, so the same sums as block_1x1 on its bytes. */
static inline void four_row(const BlockJob* j, const uint8_t* wr, int64_t n) {
    const int64_t kb = j->kb;
    const float* sr = j->w_scale + n * kb;
    const __m256i ones = _mm256_set1_epi16(1), eight = _mm256_set1_epi8(8);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b0 = 0; b0 < kb; b0 += 2) {
        if (b0 % 4 == 0) _mm_prefetch((const char*)wr + 16 * b0 + 1024, _MM_HINT_NTA);
        for (int h = 0; h < 2 && b0 + h < kb; h++) { /* h unrolled: acc in registers */
            const int64_t b = b0 + h;
            const __m256i pairs = _mm256_sub_epi16(
                _mm256_maddubs_epi16(_mm256_add_epi8(nibbles_of(wr + 16 * b), eight),
                                     _mm256_loadu_si256((const __m256i*)(j->aq + b * BLOCK))),
                _mm256_loadu_si256((const __m256i*)(j->a_pair16 + b * 16)));
            acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)),
                                     _mm256_set1_ps(sr[b] * j->a_scale[b]), acc[h]);
        }
    }
    j->y[n] = hsum(_mm256_add_ps(acc[0], acc[1]));
}

static inline void kept_row(const BlockJob* j, const uint8_t* wr, int64_t n, int width) {
    if (width == 5)
        five_row(j, wr, n);
    else
        four_row(j, wr, n);
}

/* A row kept at `width` bits (wr) -> its bytes W = c + 112 (5 bits) or c + 120 (4 bits), kb blocks, for a
 * prompt's rows. */
static void kept_unpack_row(const uint8_t* wr, int64_t kb, uint8_t* w, int width) {
    if (width == 4) {
        for (int64_t t = 0; t < kb; t++)
            _mm256_storeu_si256((__m256i*)(w + t * BLOCK), _mm256_add_epi8(nibbles_of(wr + 16 * t),
                                                                           _mm256_set1_epi8(120)));
        return;
    }
    const __m256i offset = _mm256_set1_epi8(112);
    for (int64_t g = 0; g < kb; g += FIVE_GROUP) {
        const int64_t nb = kb - g < FIVE_GROUP ? kb - g : FIVE_GROUP;
        const __m256i plane = _mm256_loadu_si256((const __m256i*)(wr + nb * 16));
        for (int t = 0; t < nb; t++)
            _mm256_storeu_si256((__m256i*)(w + (g + t) * BLOCK),
                                _mm256_add_epi8(five_codes(wr + 16 * t, plane, t), offset));
        wr += nb * 16 + 32;
    }
}

#else /* AArch64 */
static void block_quantize(const float* x, int64_t m, int64_t kb, int8_t* aq, float* a_scale) {
    for (int64_t i = 0; i < m * kb; i++) {
        const float* v = x + i * BLOCK;
        float32x4_t amax4 = vdupq_n_f32(0.0f);
        for (int c = 0; c < BLOCK; c += 4) amax4 = vmaxq_f32(amax4, vabsq_f32(vld1q_f32(v + c)));
        const float amax = vmaxvq_f32(amax4);
        const float32x4_t inverse = vdupq_n_f32(amax != 0.0f ? 127.0f / amax : 0.0f);
        for (int c = 0; c < BLOCK; c += 8) {
            const int32x4_t q0 = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(v + c), inverse));
            const int32x4_t q1 = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(v + c + 4), inverse));
            vst1_s8(aq + i * BLOCK + c, vqmovn_s16(vcombine_s16(vqmovn_s32(q0), vqmovn_s32(q1))));
        }
        a_scale[i] = amax / 127.0f;
    }
}

/* Row n's exact integer sums against activation row r, sdot on the weights as int8: w0 holds the block's codes
 * 0-15, w1 codes 16-31. */
static inline __attribute__((always_inline)) float block_sum(const BlockJob* j, int8x16_t w0, int8x16_t w1,
                                                             int64_t n, int64_t r, int64_t b) {
    const int8_t* a = j->aq + (r * j->kb + b) * BLOCK;
    const int32x4_t d = vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, vld1q_s8(a)), w1, vld1q_s8(a + 16));
    return (float)vaddvq_s32(d) * (j->w_scale[n * j->kb + b] * j->a_scale[r * j->kb + b]);
}

/* Rows [lo, hi) whose bytes are a byte each, row n's at w + (n - from) * K: the stored bytes xor 0x80. */
static void byte_rows(const BlockJob* j, const uint8_t* w, int64_t from, int64_t lo, int64_t hi) {
    const int64_t kb = j->kb, k = kb * BLOCK;
    const uint8x16_t bias = vdupq_n_u8(0x80);
    for (int64_t n = lo; n < hi; n++) {
        const uint8_t* wr = w + (n - from) * k;
        for (int64_t r = 0; r < j->m; r++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < kb; b++)
                acc += block_sum(j, vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wr + b * BLOCK), bias)),
                                 vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wr + b * BLOCK + 16), bias)), n, r, b);
            j->y[r * j->n + n] = acc;
        }
    }
}

/* Rows [lo, hi) of a run kept at 4 bits, row n's layout at w + (n - from) * four_row_bytes: the nibbles minus 8
 * are the weights as int8, byte_rows' sdot operands. */
static void four_rows(const BlockJob* j, const uint8_t* w, int64_t from, int64_t lo, int64_t hi) {
    const int64_t kb = j->kb, row = four_row_bytes(kb);
    const uint8x16_t low = vdupq_n_u8(0x0f), eight = vdupq_n_u8(8);
    for (int64_t n = lo; n < hi; n++) {
        const uint8_t* wr = w + (n - from) * row;
        for (int64_t r = 0; r < j->m; r++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < kb; b++) {
                const uint8x16_t nib = vld1q_u8(wr + 16 * b);
                acc += block_sum(j, vreinterpretq_s8_u8(vsubq_u8(vandq_u8(nib, low), eight)),
                                 vreinterpretq_s8_u8(vsubq_u8(vshrq_n_u8(nib, 4), eight)), n, r, b);
            }
            j->y[r * j->n + n] = acc;
        }
    }
}
#endif

/* Rows [lo, hi) of a segment kept at `width` bits (4, or 5 on x86-64), row n's layout at w + (n - from) *
 * kept_row_bytes: a decode step reads them as they are; on x86-64 a prompt's are decoded KEPT_ROWS at a time into
 * the chunk's scratch and go the 8-bit way. */
static void kept_rows(const BlockJob* j, const uint8_t* w, int64_t from, int64_t lo, int64_t hi, uint8_t* scratch,
                      int width) {
#if KERNEL_FIVE
    const int64_t kb = j->kb, row = kept_row_bytes(width, kb);
    if (j->m == 1) {
        if (width == 5)
            for (int64_t n = lo; n < hi; n++) kept_row(j, w + (n - from) * row, n, 5);
        else
            for (int64_t n = lo; n < hi; n++) kept_row(j, w + (n - from) * row, n, 4);
        return;
    }
    for (int64_t n = lo; n < hi; n += KEPT_ROWS) {
        const int64_t count = n + KEPT_ROWS <= hi ? KEPT_ROWS : hi - n;
        for (int64_t i = 0; i < count; i++)
            kept_unpack_row(w + (n + i - from) * row, kb, scratch + i * kb * BLOCK, width);
        byte_rows(j, scratch, n, n, n + count);
    }
#else
    (void)scratch, (void)width; /* AArch64 keeps only 4-bit runs */
    four_rows(j, w, from, lo, hi);
#endif
}

/* The offset term of rows [first, last): y[m, n] += sum over blocks b of x_sum[m, b] * offset[n, b]. The rows'
 * offsets are read as stored, one contiguous run; for a prompt, OFFSET_TILE rows at a time turned to (K/32,
 * OFFSET_TILE) so that each block is one multiply-add along the tile's rows for every row of x.
 * The offsets are float32, 4 bytes a block beside the 16 of 4-bit codes and 4 of scale: SmolLM2's Q4_1 file
 * decodes slower than its 5-bit w4 (docs/quantization.md). */
enum { OFFSET_TILE = 16 };

static void offset_rows(const BlockJob* j, int64_t first, int64_t last) {
    const int64_t kb = j->kb;
    if (j->m == 1) { /* a decode step: each row's offsets against the block sums, 8 partial sums (vector lanes) */
        const int64_t kv = kb / 8 * 8;
        for (int64_t n = first; n < last; n++) {
            const float* o = j->offset + n * kb;
            float part[8] = {0};
            for (int64_t b = 0; b < kv; b += 8)
                for (int l = 0; l < 8; l++) part[l] += o[b + l] * j->x_sum[b + l];
            for (int64_t b = kv; b < kb; b++) part[b - kv] += o[b] * j->x_sum[b];
            j->y[n] += ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        }
        return;
    }
    float tile[kb * OFFSET_TILE];
    for (int64_t n0 = first; n0 < last; n0 += OFFSET_TILE) {
        const int64_t count = last - n0 < OFFSET_TILE ? last - n0 : OFFSET_TILE;
        for (int64_t i = 0; i < OFFSET_TILE; i++)
            for (int64_t b = 0; b < kb; b++) tile[b * OFFSET_TILE + i] = i < count ? j->offset[(n0 + i) * kb + b] : 0;
        for (int64_t m = 0; m < j->m; m++) {
            float acc[OFFSET_TILE] = {0};
            const float* xs = j->x_sum + m * kb;
            for (int64_t b = 0; b < kb; b++)
                for (int i = 0; i < OFFSET_TILE; i++) acc[i] += xs[b] * tile[b * OFFSET_TILE + i];
            float* y = j->y + m * j->n + n0;
            for (int64_t i = 0; i < count; i++) y[i] += acc[i];
        }
    }
}

/* Rows [first, last) of a packed kernel, segment by segment: each run of rows at its width. */
static void segment_rows(const BlockJob* j, size_t chunk, int64_t first, int64_t last) {
    const Kernel* k = j->packed;
    (void)chunk; /* the scratch's index, where narrow rows are decoded */
    int64_t start = 0;
    for (size_t s = 0; s < k->seg.count; start += k->seg.rows[s], s++) {
        const int64_t lo = first > start ? first : start, end = start + k->seg.rows[s], hi = last < end ? last : end;
        if (lo >= hi) continue;
        if (k->kept[s])
#if KERNEL_FIVE
            kept_rows(j, k->blocks + k->offset[s], start, lo, hi,
                      j->scratch + (int64_t)chunk * KEPT_ROWS * j->kb * BLOCK, k->kept[s]);
#else
            kept_rows(j, k->blocks + k->offset[s], start, lo, hi, NULL, k->kept[s]);
#endif
        else
            byte_rows(j, k->blocks + k->offset[s], start, lo, hi);
    }
}

/* Rows [first, last) of chunk `chunk`, segment by segment where some rows are kept narrow, then their offset
 * term where there is one. */
static void block_run_chunk(void* data, size_t chunk) {
    const BlockJob* j = (const BlockJob*)data;
    const int64_t first = j->n * (int64_t)chunk / j->chunks, last = j->n * ((int64_t)chunk + 1) / j->chunks;
    if (j->packed)
        segment_rows(j, chunk, first, last);
    else
        byte_rows(j, j->w, 0, first, last);
    if (j->offset) offset_rows(j, first, last);
}

static int64_t element_count(const OrtValue* value) {
    OrtTensorTypeAndShapeInfo* info;
    size_t count = 0;
    if (g_api->GetTensorTypeAndShape(value, &info)) return -1; /* a status here is not expected; leaked */
    OrtStatus* status = g_api->GetTensorShapeElementCount(info, &count);
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    if (status) {
        g_api->ReleaseStatus(status);
        return -1;
    }
    return (int64_t)count;
}

static OrtStatus* ORT_API_CALL block_compute(void* kernel, OrtKernelContext* context) {
    const Kernel* unpacked = (const Kernel*)kernel;
    const OrtValue* in[4] = {NULL};
    size_t inputs = 0;
    RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(context, &inputs));
    for (size_t i = 0; i < 4 && i < inputs; i++) RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &in[i]));
    int64_t x_dims[8], w_dims[8] = {unpacked->n, unpacked->kb, BLOCK};
    size_t x_rank, w_rank = 3;
    RETURN_IF_ERROR(shape_of(in[0], x_dims, &x_rank));
    if (!unpacked->blocks) RETURN_IF_ERROR(shape_of(in[1], w_dims, &w_rank));
    if (x_rank < 1 || w_rank != 3 || w_dims[2] != BLOCK || x_dims[x_rank - 1] != BLOCK * w_dims[1]
        || element_count(in[2]) != w_dims[0] * w_dims[1])
        return g_api->CreateStatus(ORT_INVALID_ARGUMENT,
                                   "BlockInt8MatMul: x (..., K) needs blocks (N, K/32, 32) and N * K/32 scales");
    if (in[3] && element_count(in[3]) != w_dims[0] * w_dims[1])
        return g_api->CreateStatus(ORT_INVALID_ARGUMENT, "BlockInt8MatMul: offsets are N * K/32 floats");
    BlockJob job = {0};
    job.kb = w_dims[1];
    job.n = w_dims[0];
    RETURN_IF_ERROR(output_rows(context, x_dims, x_rank, job.n, &job.y, &job.m));
    const float* x = (const float*)data_of(in[0]);
    job.w = unpacked->blocks ? unpacked->blocks : (const uint8_t*)data_of(in[1]);
    job.w_scale = (const float*)data_of(in[2]);
    job.offset = in[3] ? (const float*)data_of(in[3]) : NULL;
    if (job.m == 0 || job.n == 0) return NULL;
    if (!job.y || !x || !job.w || !job.w_scale || (in[3] && !job.offset))
        return g_api->CreateStatus(ORT_FAIL, "BlockInt8MatMul: an input has no data");
    const size_t blocks = (size_t)(job.m * job.kb);
    const size_t sums = job.offset ? blocks * sizeof(float) : 0; /* x_sum */
    /* a few chunks per thread, for even finish times; below 1024 rows, chunks of 64 rows, since a layer's
     * MatMuls (576 or 192 rows) on one thread left the other idle: SmolLM2's w4-native, 2 threads, VNNI EPYC,
     * 8.2 -> 6.5 ms/token */
    job.chunks = job.n < 1024 ? (job.n + 63) / 64 : 64;
    job.packed = unpacked->blocks && unpacked->any_kept ? unpacked : NULL;
#if KERNEL_FIVE
    /* with narrow rows, a prompt's decoded rows: KEPT_ROWS per chunk */
    const size_t decoded = job.packed && job.m > 1 ? (size_t)(job.chunks * KEPT_ROWS * job.kb * BLOCK) : 0;
#endif
#if KERNEL_AVX512
    const size_t extra = (size_t)(job.m * ((job.kb + 1) / 2) * 16) * sizeof(int32_t); /* a_corr */
#elif KERNEL_AVX2
    /* with narrow rows, each block's pair sums */
    const size_t extra = job.packed ? blocks * 16 * sizeof(int16_t) : 0;
#else
    const size_t extra = 0, decoded = 0;
#endif
    void* scratch = malloc(sums + blocks * BLOCK + blocks * sizeof(float) + extra + decoded);
    if (!scratch) return g_api->CreateStatus(ORT_FAIL, "BlockInt8MatMul: out of memory");
    float* x_sum = (float*)scratch;
    float* a_scale = (float*)((char*)scratch + sums);
    int8_t* aq = (int8_t*)(a_scale + blocks);
    if (job.offset) {
        for (size_t b = 0; b < blocks; b++) {
            float total = 0.0f;
            for (int i = 0; i < BLOCK; i++) total += x[b * BLOCK + i];
            x_sum[b] = total;
        }
        job.x_sum = x_sum;
    }
#if KERNEL_AVX512
    int32_t* a_corr = (int32_t*)(aq + blocks * BLOCK);
    block_quantize(x, job.m, job.kb, aq, a_scale, a_corr);
    job.a_corr = a_corr;
#else
    block_quantize(x, job.m, job.kb, aq, a_scale);
#endif
#if KERNEL_AVX2
    if (job.packed) {
        int16_t* a_pair16 = (int16_t*)(aq + blocks * BLOCK);
        five_pair_sums(aq, blocks, a_pair16);
        job.a_pair16 = a_pair16;
    }
#endif
#if KERNEL_FIVE
    job.scratch = (uint8_t*)(aq + blocks * BLOCK) + extra;
#endif
    job.aq = aq;
    job.a_scale = a_scale;
    OrtStatus* status = g_api->KernelContext_ParallelFor(context, block_run_chunk, (size_t)job.chunks, 0, &job);
    free(scratch);
    return status;
}

static OrtStatus* invalid_argument(const char* what) {
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, what);
}

/* One attribute's int64 list into out[MAX_SEGMENTS]; its length in *count. */
static OrtStatus* int_list(const OrtKernelInfo* info, const char* name, int64_t* out, size_t* count) {
    *count = 0;
    RETURN_IF_ERROR(g_api->KernelInfoGetAttributeArray_int64(info, name, NULL, count));
    if (*count == 0 || *count > MAX_SEGMENTS)
        return invalid_argument("pipeline kernels: `bits` and `rows` need 1 to 64 entries");
    return g_api->KernelInfoGetAttributeArray_int64(info, name, out, count);
}

/* Asks Linux to reclaim the whole pages of [data, data + bytes), which nothing reads again: where onnxruntime maps
 * the initializer from the model's data file, the clean pages that unpacking read leave the process's resident
 * memory (they are read from the file again if ever touched); elsewhere (an initializer in the heap, without
 * swap) nothing happens. MADV_PAGEOUT never changes what the memory holds. */
static void release_pages(const void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_PAGEOUT)
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t start = ((uintptr_t)data + page - 1) & ~(page - 1), end = ((uintptr_t)data + bytes) & ~(page - 1);
    if (end > start) (void)madvise((void*)start, end - start, MADV_PAGEOUT);
#else
    (void)data, (void)bytes;
#endif
}

/* The attributes K, bits and rows (see BlockInt8MatMul above) -> k->seg, k->n, k->kb; the constant input
 * `input` (the packed codes) checked against them, its data in *src. */
static OrtStatus* read_segments(const OrtKernelInfo* info, int64_t K, size_t input, Kernel* k, const OrtValue** src) {
    Segments* seg = &k->seg;
    size_t count;
    RETURN_IF_ERROR(int_list(info, "bits", seg->bits, &seg->count));
    RETURN_IF_ERROR(int_list(info, "rows", seg->rows, &count));
    if (count != seg->count || K <= 0 || K % BLOCK)
        return invalid_argument("pipeline kernels: packed codes need K a multiple of 32 and one `rows` entry per `bits`");
    k->n = seg->bytes = 0;
    k->kb = K / BLOCK;
    for (size_t s = 0; s < seg->count; s++) {
        if (seg->bits[s] < 2 || seg->bits[s] > 8 || seg->rows[s] <= 0)
            return invalid_argument("pipeline kernels: packed codes are 2 to 8 bits, in segments of at least one row");
        k->n += seg->rows[s];
        seg->bytes += seg->rows[s] * k->kb * 4 * seg->bits[s];
    }
    int constant = 0;
    RETURN_IF_ERROR(g_api->KernelInfoGetConstantInput_tensor(info, input, &constant, src));
    if (!constant || !*src)
        return invalid_argument("pipeline kernels: packed codes must be an initializer");
    if (element_count(*src) != seg->bytes)
        return invalid_argument("pipeline kernels: the packed codes' size does not match K, bits and rows");
    return NULL;
}

/* `blocks` blocks of 32 codes packed at b bits (4b bytes each) -> W = code + 128 - 2^(b-1), a byte each. */
static const uint8_t* unpack_run(const uint8_t* src, int b, int64_t blocks, uint8_t* dst) {
    const uint32_t mask = (1u << b) - 1, shift = 128u - (1u << (b - 1));
    for (int64_t block = 0; block < blocks; block++) {
        uint32_t acc = 0;
        int have = 0;
        for (int i = 0; i < BLOCK; i++) {
            while (have < b) {
                acc |= (uint32_t)*src++ << have;
                have += 8;
            }
            *dst++ = (uint8_t)((acc & mask) + shift);
            acc >>= b;
            have -= b;
        }
    }
    return src;
}

/* Packed codes (the attributes K, bits, rows and the constant input 1, see BlockInt8MatMul above) -> k->blocks. */
static OrtStatus* unpack_blocks(const OrtKernelInfo* info, int64_t K, Kernel* k) {
    const OrtValue* value = NULL;
    RETURN_IF_ERROR(read_segments(info, K, 1, k, &value));
    const uint8_t* src = (const uint8_t*)data_of(value);
    int64_t total = 0;
    for (size_t s = 0; s < k->seg.count; s++) {
        k->offset[s] = total;
        const int64_t b = k->seg.bits[s];
        k->kept[s] = (unsigned char)(b == 4 || (KERNEL_FIVE && b == 5) ? b : 0);
        k->any_kept |= k->kept[s] != 0;
        total += k->seg.rows[s] * kept_row_bytes(k->kept[s], k->kb);
    }
    k->blocks = (uint8_t*)malloc((size_t)total);
    uint8_t* row = k->any_kept ? (uint8_t*)malloc((size_t)K) : NULL;
    if (!src || !k->blocks || (k->any_kept && !row)) {
        free(row);
        return g_api->CreateStatus(ORT_FAIL, "BlockInt8MatMul: out of memory");
    }
    for (size_t s = 0; s < k->seg.count; s++) {
        uint8_t* dst = k->blocks + k->offset[s];
        if (k->kept[s]) { /* a row at a time: to bytes, then to the layout it is kept in */
            for (int64_t r = 0; r < k->seg.rows[s]; r++, dst += kept_row_bytes(k->kept[s], k->kb)) {
                src = unpack_run(src, k->kept[s], k->kb, row);
#if KERNEL_FIVE
                if (k->kept[s] == 5) {
                    five_pack_row(row, k->kb, dst);
                    continue;
                }
#endif
                four_pack_row(row, k->kb, dst);
            }
            continue;
        }
        src = unpack_run(src, (int)k->seg.bits[s], k->seg.rows[s] * k->kb, dst);
    }
    free(row);
    release_pages(data_of(value), (size_t)k->seg.bytes);
    return NULL;
}

/* ---- BlockGather ------------------------------------------------------------------------------------------
 *
 *   y[..., :] = rows ids[...] of the blocks BlockInt8MatMul reads, dequantized: (W[id, b, i] - 128) * scale[id, b]
 *
 * which is what the graph a tied table shares its head's 8-bit blocks with computes (Gather of the blocks and of
 * the scales, Cast, Sub 128, Mul, Reshape: exporters/quantization/embedding.py `share_tied_table`), to the bit,
 * for a head whose codes are stored packed (attributes K, bits, rows and input 0 as BlockInt8MatMul's input 1):
 * the table is then stored once, at its codes' width. Only the rows asked for are decoded, from the stored packed
 * codes (the head's unpacked copy belongs to its own kernel).
 *
 * Inputs: 0 packed uint8 (flat, an initializer); 1 ids int64 (...), negative ones counted from the end as
 * Gather's; 2 scales float (N * K/32). Output: y float (..., K).
 */
static OrtStatus* ORT_API_CALL gather_compute(void* kernel, OrtKernelContext* context) {
    const Kernel* k = (const Kernel*)kernel;
    const OrtValue* in[3];
    for (size_t i = 0; i < 3; i++) RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &in[i]));
    int64_t dims[8];
    size_t rank;
    RETURN_IF_ERROR(shape_of(in[1], dims, &rank));
    if (rank > 7 || element_count(in[0]) != k->seg.bytes || element_count(in[2]) != k->n * k->kb)
        return g_api->CreateStatus(ORT_INVALID_ARGUMENT,
                                   "BlockGather: ids of rank < 8 need the packed codes of K, bits, rows and N * K/32 "
                                   "scales");
    const int64_t K = k->kb * BLOCK, count = element_count(in[1]);
    dims[rank] = K;
    OrtValue* out;
    RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, dims, rank + 1, &out));
    float* y = (float*)data_of(out);
    const int64_t* ids = (const int64_t*)data_of(in[1]);
    const uint8_t* packed = (const uint8_t*)data_of(in[0]);
    const float* scales = (const float*)data_of(in[2]);
    if (count == 0) return NULL;
    if (!y || !ids || !packed || !scales) return g_api->CreateStatus(ORT_FAIL, "BlockGather: an input has no data");
    uint8_t codes[BLOCK];
    for (int64_t t = 0; t < count; t++, y += K) {
        int64_t id = ids[t] < 0 ? ids[t] + k->n : ids[t];
        if (id < 0 || id >= k->n)
            return g_api->CreateStatus(ORT_INVALID_ARGUMENT, "BlockGather: a token id outside the table");
        const uint8_t* src = packed;
        size_t s = 0;
        int64_t row = id;
        for (; row >= k->seg.rows[s]; s++) { /* the run the row is in, and the bytes before it */
            row -= k->seg.rows[s];
            src += k->seg.rows[s] * k->kb * 4 * k->seg.bits[s];
        }
        const int b = (int)k->seg.bits[s];
        src += row * k->kb * 4 * b;
        const float* scale = scales + id * k->kb;
        for (int64_t j = 0; j < k->kb; j++) {
            src = unpack_run(src, b, 1, codes);
            for (int i = 0; i < BLOCK; i++) y[j * BLOCK + i] = (float)((int)codes[i] - 128) * scale[j];
        }
    }
    return NULL;
}

/* ---- GluRotate: a gated MLP's down_proj input in one op --------------------------------------------------
 *
 * x (..., 2F), its gate and up halves side by side (the gate_up MatMul's output), -> y (..., F): h = act(gate) *
 * up, act silu or, with the attribute activation = "gelu_tanh", GELU's tanh form (onnxruntime's FastGelu); then,
 * in blocks of b, h times the b x b matrix R (the online Hadamard before down_proj; b = 1 with R = [[1]] is no
 * rotation). In the graph that is Split, Sigmoid, two Muls (or FastGelu, Mul), Reshape, MatMul, Reshape: up to
 * seven nodes a layer whose dispatch costs more than their arithmetic (SmolLM2's w4-native decodes 5% faster).
 * A randomized Sylvester R (the online Hadamard of orders 2^a) is a fast Walsh-Hadamard transform; any other a
 * register tile (4 rows by two vectors, or one row by eight) a step over R's rows. */
enum { ROT_ROWS = 4 };

typedef struct {
    const float* x;
    const float* r;
    float* y;
    float* h;               /* (chunks, ROT_ROWS, F): each chunk's h rows before the rotation */
    const float* signs;     /* the kernel's `signs`: the rotation as a fast Walsh-Hadamard transform */
    int64_t m, f, b, chunks;
    int gelu;               /* the activation is GELU's tanh form, not silu */
} GatedJob;

/* A register of floats as the compiler's vectors: 16 on AVX-512, 8 on AVX2, 4 on NEON; aligned(4), so a pointer
 * to one reads floats at any float's address (memcpy into one went through the stack on AVX2, 8x slower). */
#if KERNEL_AVX512
enum { VW = 16 };
#elif KERNEL_AVX2
enum { VW = 8 };
#else
enum { VW = 4 };
#endif
typedef float fvec __attribute__((vector_size(VW * sizeof(float)), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(VW * sizeof(int32_t))));

/* ROWS rows of h (row stride f), columns [c, c + VW * VECS) of the block at c0, times R (b x b) into y: ROWS * VECS
 * accumulators (at most 8, with R's row in VECS more: within AVX2's 16 registers), each step over R's rows one load
 * of VECS vectors. */
static inline __attribute__((always_inline)) void rotate_tile(const float* h, int64_t f, const float* r, int64_t b,
                                                              int64_t c0, int64_t c, float* y, const int ROWS,
                                                              const int VECS) {
    fvec acc[4][8];
    for (int q = 0; q < ROWS; q++)
        for (int v = 0; v < VECS; v++) acc[q][v] = (fvec){0};
    for (int64_t i = 0; i < b; i++) {
        fvec ri[8];
        for (int v = 0; v < VECS; v++) ri[v] = *(const fvec*)(r + i * b + (c - c0) + VW * v);
        for (int q = 0; q < ROWS; q++) {
            const float hv = h[q * f + c0 + i];
            for (int v = 0; v < VECS; v++) acc[q][v] += hv * ri[v];
        }
    }
    for (int q = 0; q < ROWS; q++)
        for (int v = 0; v < VECS; v++) *(fvec*)(y + q * f + c + VW * v) = acc[q][v];
}

/* count rows of h (count <= ROT_ROWS), each block of b columns times R, into y. */
static void rotate_rows(const float* h, int64_t f, const float* r, int64_t b, int64_t count, float* y) {
    for (int64_t c0 = 0; c0 < f; c0 += b) {
        if (count == 4 && b % (2 * VW) == 0) {
            for (int64_t c = c0; c < c0 + b; c += 2 * VW) rotate_tile(h, f, r, b, c0, c, y, 4, 2);
        } else if (b % (8 * VW) == 0) {
            for (int64_t q = 0; q < count; q++)
                for (int64_t c = c0; c < c0 + b; c += 8 * VW) rotate_tile(h + q * f, f, r, b, c0, c, y + q * f, 1, 8);
        } else if (b % (2 * VW) == 0) {
            for (int64_t q = 0; q < count; q++)
                for (int64_t c = c0; c < c0 + b; c += 2 * VW) rotate_tile(h + q * f, f, r, b, c0, c, y + q * f, 1, 2);
        } else { /* a width no tile fits */
            for (int64_t q = 0; q < count; q++)
                for (int64_t j = 0; j < b; j++) {
                    float sum = 0.0f;
                    for (int64_t i = 0; i < b; i++) sum += h[q * f + c0 + i] * r[i * b + j];
                    y[q * f + c0 + j] = sum;
                }
        }
    }
}

/* e^x for VW lanes as 2^n * p(r) with n = round(x / ln 2), |r| <= ln 2 / 2 and p Cephes's degree-6 polynomial (2
 * ulp): no libm call, no branch. x is clamped to +-88 (bit masks: GCC does not vectorize a float select on AVX2),
 * where e^88 is still a float; from about -87.7 down the result is 0 (e^x below float's normal range). */
static inline __attribute__((always_inline)) fvec exp_vec(fvec x) {
    const fvec zero = {0}, lo = zero - 88.0f, hi = zero + 88.0f;
    ivec below = x < lo, above = x > hi;
    x = (fvec)(((ivec)x & ~below) | ((ivec)lo & below));
    x = (fvec)(((ivec)x & ~above) | ((ivec)hi & above));
    const fvec t = x * 1.44269504f;
    const fvec n = (t + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    const fvec r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    fvec p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
    return p * (fvec)bits;
}

/* 1 / (1 + e^-g) for VW lanes; beyond +-88 the sum is 1 or over 1e38. */
static inline __attribute__((always_inline)) fvec sigmoid_vec(fvec g) { return 1.0f / (1.0f + exp_vec(-g)); }

/* act(g) * u: silu(g) = g * sigmoid(g); GELU's tanh form 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))) =
 * g * sigmoid(2 sqrt(2 / pi) (g + 0.044715 g^3)). */
static inline __attribute__((always_inline)) fvec gated(fvec g, fvec u, int gelu) {
    return g * u * sigmoid_vec(gelu ? (g + g * g * g * 0.044715f) * 1.5957691216f : g);
}

/* h = act(gate) * up, f values; VW at a time, the tail through a zero-padded vector. */
static void gated_row(const float* gate, const float* up, int64_t f, int gelu, float* h) {
    int64_t i = 0;
    for (; i + VW <= f; i += VW) *(fvec*)(h + i) = gated(*(const fvec*)(gate + i), *(const fvec*)(up + i), gelu);
    if (i < f) {
        fvec g = {0}, u = {0};
        for (int64_t j = i; j < f; j++) g[j - i] = gate[j], u[j - i] = up[j];
        const fvec out = gated(g, u, gelu);
        for (int64_t j = i; j < f; j++) h[j] = out[j - i];
    }
}

/* Lane j of x and lane j ^ L (L < VW): GCC's and clang's spelling of a constant shuffle. */
#if KERNEL_AVX512
#define XOR1 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14
#define XOR2 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13
#define XOR4 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11
#define XOR8 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7
#elif KERNEL_AVX2
#define XOR1 1, 0, 3, 2, 5, 4, 7, 6
#define XOR2 2, 3, 0, 1, 6, 7, 4, 5
#define XOR4 4, 5, 6, 7, 0, 1, 2, 3
#else
#define XOR1 1, 0, 3, 2
#define XOR2 2, 3, 0, 1
#endif
#if defined(__clang__)
#define LANES(x, ...) __builtin_shufflevector(x, x, __VA_ARGS__)
#else
#define LANES(x, ...) __builtin_shuffle(x, (ivec){__VA_ARGS__})
#endif

/* One round of sums and differences between lanes L apart within *v (L < VW): lane j gets x[j] + x[j ^ L] where
 * bit L of j is clear, x[j ^ L] - x[j] where it is set (exactly the scalar round's a + c and a - c). By pointer: a
 * 64-byte vector by value would be another ABI on the AVX2 build. */
static inline __attribute__((always_inline)) void hadamard_round(fvec* v, int L) {
    static const float sign[4][16] = {{1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1},
                                      {1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1},
                                      {1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1},
                                      {1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1}};
    const fvec x = *v;
    const fvec s = *(const fvec*)sign[__builtin_ctz((unsigned)L)];
    switch (L) {
    case 1: *v = LANES(x, XOR1) + x * s; break;
    case 2: *v = LANES(x, XOR2) + x * s; break;
#if KERNEL_AVX512 || KERNEL_AVX2
    case 4: *v = LANES(x, XOR4) + x * s; break;
#endif
#if KERNEL_AVX512
    case 8: *v = LANES(x, XOR8) + x * s; break;
#endif
    }
}

/* v (b, a power of 2) times diag(signs) and Sylvester's Hadamard matrix of order b, in place: log2(b) rounds of
 * sums and differences, b log2(b) additions where the matrix product takes b^2 multiply-adds. From b = VW on (up
 * to 4096) in vectors: the first rounds within each vector, the others between vectors; the same sums as the
 * scalar rounds, in the same order. */
static void walsh_hadamard(float* v, const float* signs, int64_t b) {
    if (b < VW || b > 4096) {
        for (int64_t i = 0; i < b; i++) v[i] *= signs[i];
        for (int64_t len = 1; len < b; len <<= 1)
            for (int64_t i = 0; i < b; i += 2 * len)
                for (int64_t j = i; j < i + len; j++) {
                    const float a = v[j], c = v[j + len];
                    v[j] = a + c;
                    v[j + len] = a - c;
                }
        return;
    }
    fvec x[4096 / VW];
    const int64_t n = b / VW;
    for (int64_t i = 0; i < n; i++) {
        x[i] = *(const fvec*)(v + VW * i) * *(const fvec*)(signs + VW * i);
        hadamard_round(&x[i], 1);
        hadamard_round(&x[i], 2);
#if KERNEL_AVX512 || KERNEL_AVX2
        hadamard_round(&x[i], 4);
#endif
#if KERNEL_AVX512
        hadamard_round(&x[i], 8);
#endif
    }
    for (int64_t len = 1; len < n; len <<= 1)
        for (int64_t i = 0; i < n; i += 2 * len)
            for (int64_t j = i; j < i + len; j++) {
                const fvec a = x[j], c = x[j + len];
                x[j] = a + c;
                x[j + len] = a - c;
            }
    for (int64_t i = 0; i < n; i++) *(fvec*)(v + VW * i) = x[i];
}

/* R (b x b) -> its first column, copied, where R = diag(that column) * H_b, H_b Sylvester's (+-1) Hadamard matrix:
 * the online rotation (exporters/rotation.py `online_matrix`, orders 2^a) is; else NULL (the dense product). */
static float* sylvester_signs(const float* r, int64_t b) {
    if (b < 2 || b & (b - 1)) return NULL;
    const float scale = fabsf(r[0]);
    for (int64_t i = 0; i < b; i++) {
        if (!(fabsf(fabsf(r[i * b]) - scale) <= 1e-6f * scale)) return NULL;
        for (int64_t j = 0; j < b; j++) {
            const float want = __builtin_popcountll((unsigned long long)(i & j)) % 2 ? -r[i * b] : r[i * b];
            if (!(fabsf(r[i * b + j] - want) <= 1e-6f * scale)) return NULL;
        }
    }
    float* signs = (float*)malloc(sizeof(float) * (size_t)b);
    if (signs)
        for (int64_t i = 0; i < b; i++) signs[i] = r[i * b];
    return signs;
}

static void gated_run_chunk(void* data, size_t chunk) {
    const GatedJob* j = (const GatedJob*)data;
    const int64_t first = j->m * (int64_t)chunk / j->chunks, last = j->m * ((int64_t)chunk + 1) / j->chunks;
    float* h = j->h + (int64_t)chunk * ROT_ROWS * j->f;
    for (int64_t r0 = first; r0 < last; r0 += ROT_ROWS) {
        const int64_t count = last - r0 < ROT_ROWS ? last - r0 : ROT_ROWS;
        float* out = j->y + r0 * j->f;
        float* rows = j->b == 1 || j->signs ? out : h; /* h is the output, rotated in place or not at all */
        for (int64_t q = 0; q < count; q++) {
            const float* gate = j->x + (r0 + q) * 2 * j->f;
            gated_row(gate, gate + j->f, j->f, j->gelu, rows + q * j->f);
        }
        if (j->signs) /* h times diag(signs) H_b: the fast transform of each block, in place */
            for (int64_t q = 0; q < count; q++)
                for (int64_t c = 0; c < j->f; c += j->b) walsh_hadamard(out + q * j->f + c, j->signs, j->b);
        else if (j->b > 1)
            rotate_rows(h, j->f, j->r, j->b, count, out);
        else if (j->r[0] != 1.0f) /* b = 1: R a scale, [[1]] being none */
            for (int64_t i = 0; i < count * j->f; i++) out[i] *= j->r[0];
    }
}

static OrtStatus* ORT_API_CALL gated_compute(void* kernel, OrtKernelContext* context) {
    const Kernel* k = (const Kernel*)kernel;
    const OrtValue* in[2];
    for (size_t i = 0; i < 2; i++) RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &in[i]));
    int64_t x_dims[8], r_dims[8];
    size_t x_rank, r_rank;
    RETURN_IF_ERROR(shape_of(in[0], x_dims, &x_rank));
    RETURN_IF_ERROR(shape_of(in[1], r_dims, &r_rank));
    GatedJob job = {0};
    job.f = x_rank ? x_dims[x_rank - 1] / 2 : 0;
    job.b = r_rank == 2 ? r_dims[0] : 0;
    if (x_rank < 1 || x_dims[x_rank - 1] % 2 || r_rank != 2 || r_dims[1] != job.b || job.b < 1 || job.f % job.b)
        return g_api->CreateStatus(ORT_INVALID_ARGUMENT, "GluRotate: x (..., 2F) needs R (b, b) with b dividing F");
    RETURN_IF_ERROR(output_rows(context, x_dims, x_rank, job.f, &job.y, &job.m));
    job.x = (const float*)data_of(in[0]);
    job.r = (const float*)data_of(in[1]);
    if (job.m == 0 || job.f == 0) return NULL;
    if (!job.y || !job.x || !job.r) return g_api->CreateStatus(ORT_FAIL, "GluRotate: an input has no data");
    /* groups of ROT_ROWS rows, a few per thread; one step's row on the calling thread */
    const int64_t groups = (job.m + ROT_ROWS - 1) / ROT_ROWS;
    job.chunks = groups < 64 ? groups : 64;
    job.signs = k->signs && k->signs_b == job.b ? k->signs : NULL;
    job.gelu = k->gelu;
    const int dense = job.b > 1 && !job.signs;
    job.h = dense ? (float*)malloc(sizeof(float) * (size_t)(job.chunks * ROT_ROWS * job.f)) : NULL;
    if (dense && !job.h) return g_api->CreateStatus(ORT_FAIL, "GluRotate: out of memory");
    OrtStatus* status = NULL;
    if (job.chunks == 1)
        gated_run_chunk(&job, 0);
    else
        status = g_api->KernelContext_ParallelFor(context, gated_run_chunk, (size_t)job.chunks, 0, &job);
    free(job.h);
    return status;
}

/* ---- CacheAttention: GroupQueryAttention's arithmetic on its in-place KV cache ---------------------------- */
/* com.microsoft GroupQueryAttention (CPU, float) for packed QKV with rotary (non-interleaved, over the first
 * 2 * cos_cache's width dimensions of each head), what the fused graphs hold, written so that a one-token step
 * costs what its arithmetic does and a long prompt's chunks run at the machine's float rate: onnxruntime's kernel
 * allocates temporary buffers and transposes QKV on every call, and computes each chunk's scores as one GEMM per
 * head into a (S, T) buffer that softmax and the product with V then read again. Measured: a 1536-token prompt's
 * attention in SmolLM2 1.5x faster than onnxruntime's, decode unchanged (docs/quantization.md), so `optimize
 * --native-int8` puts it in by default.
 *
 * Inputs: 0 qkv (B, S, (NH + 2 KVH) H); 1, 2 past key and value (B, KVH, P, H); 3 seqlens_k int32 (B): each
 * row's total length - 1; 4 total_sequence_length int32 scalar; 5, 6 cos and sin caches (positions, R / 2).
 * Outputs: 0 (B, S, NH H); 1, 2 present key and value (B, KVH, max(P, total), H): the past's buffers when the
 * caller binds them to the same memory (the runtime's in-place cache), else copies of the past.
 * Attributes: num_heads, kv_num_heads, scale (0: 1 / sqrt(H)), softcap (0: none), local_window_size (-1: none).
 *
 * As onnxruntime's: S == total_sequence_length is a first prompt (past 0; a row's positions beyond its own
 * length are padding), else each row continues its cache at total - S; query row s attends to keys [lo, past
 * + s + 1), lo = that - window with a window. Its scores are scale * q.k, soft-capped as cap * tanh(x /
 * cap), then softmax. What differs is the order of float sums (within 3e-5 of onnxruntime's, tested).
 *
 * Work: for each KV head, its group's query vectors (rows x heads sharing it) go VW at a time, one per lane:
 * the scores of a key for VW query vectors are H multiply-adds of a query tile (transposed once: H x VW) by the
 * key's broadcast elements, so nothing is reduced across lanes; softmax runs over keys per lane, online in
 * blocks of ATTN_KEYS keys (flash attention's running max and sum), and the values accumulate the same way.
 * Units (batch row, KV head, VW query vectors) go over onnxruntime's thread pool. */
enum { ATTN_KEYS = 64, ATTN_MAX_HEAD = 256 };

typedef struct {
    const float* qkv;
    float *key, *value, *out;
    const float *cos, *sin;
    const int32_t* seqlens;
    int64_t batch, s, nh, kvh, h, p, half, positions;
    int first;
    float scale, softcap;
    int64_t window, per_head; /* per_head: units of VW query vectors per KV head */
    float* scores;            /* few query vectors: a row of scores per unit, `stride` floats apart */
    int64_t stride;
} AttnJob;

/* x (h) rotated at `pos` into y (non-interleaved: pairs i, i + half), times `mul`. */
static void rotary(const AttnJob* job, const float* x, int64_t pos, float mul, float* y) {
    const float* c = job->cos + pos * job->half;
    const float* sn = job->sin + pos * job->half;
    for (int64_t i = 0; i < job->half; i++) {
        y[i] = (x[i] * c[i] - x[i + job->half] * sn[i]) * mul;
        y[i + job->half] = (x[i + job->half] * c[i] + x[i] * sn[i]) * mul;
    }
    for (int64_t i = 2 * job->half; i < job->h; i++) y[i] = x[i] * mul;
}

static inline int64_t attn_past(const AttnJob* job, int64_t b) {
    return job->first ? 0 : (int64_t)job->seqlens[b] + 1 - job->s;
}

static inline __attribute__((always_inline)) fvec select_vec(ivec keep, fvec a, fvec b) {
    return (fvec)(((ivec)a & keep) | ((ivec)b & ~keep));
}

/* -std=c11 keeps GCC from fusing a * b + c into one instruction (clang fuses within a statement already); here
 * the multiply-adds are most of the work */
#if defined(__GNUC__) && !defined(__clang__)
#define FUSED_MULTIPLY_ADD __attribute__((optimize("fp-contract=fast")))
#else
#define FUSED_MULTIPLY_ADD
#endif

FUSED_MULTIPLY_ADD static void attend_unit(void* data, size_t index) {
    const AttnJob* job = (const AttnJob*)data;
    const int64_t unit = (int64_t)index, g_heads = job->nh / job->kvh, h = job->h;
    const int64_t b = unit / (job->kvh * job->per_head), g = unit / job->per_head % job->kvh;
    const int64_t v0 = unit % job->per_head * VW, vectors = job->s * g_heads;
    const int64_t n = vectors - v0 < VW ? vectors - v0 : VW;
    const int64_t total = (int64_t)job->seqlens[b] + 1, past = attn_past(job, b);
    const int64_t width = (job->nh + 2 * job->kvh) * h;
    fvec qt[ATTN_MAX_HEAD], acc[ATTN_MAX_HEAD], sc[ATTN_KEYS];
    float row[ATTN_MAX_HEAD];
    int32_t lo_l[VW], hi_l[VW];
    int64_t first_key = total, last_key = 0;
    for (int64_t d = 0; d < h; d++) qt[d] = acc[d] = (fvec){0};
    for (int64_t l = 0; l < VW; l++) {
        lo_l[l] = 0, hi_l[l] = 0; /* an empty lane: every key masked */
        if (l >= n) continue;
        const int64_t v = v0 + l, s = v / g_heads, head = g * g_heads + v % g_heads;
        rotary(job, job->qkv + (b * job->s + s) * width + head * h, past + s, job->scale, row);
        for (int64_t d = 0; d < h; d++) qt[d][l] = row[d];
        int64_t hi = past + s + 1 < total ? past + s + 1 : total;
        int64_t lo = job->window > 0 && hi > job->window ? hi - job->window : 0;
        lo_l[l] = (int32_t)lo, hi_l[l] = (int32_t)hi;
        if (lo < first_key) first_key = lo;
        if (hi > last_key) last_key = hi;
    }
    ivec lo_v, hi_v;
    for (int64_t l = 0; l < VW; l++) lo_v[l] = lo_l[l], hi_v[l] = hi_l[l];
    const float* keys = job->key + (b * job->kvh + g) * job->p * h;
    const float* values = job->value + (b * job->kvh + g) * job->p * h;
    fvec m = (fvec){0} - 1e30f, sum = (fvec){0};
    for (int64_t j0 = first_key; j0 < last_key; j0 += ATTN_KEYS) {
        const int64_t count = last_key - j0 < ATTN_KEYS ? last_key - j0 : ATTN_KEYS;
        int64_t j = 0;
        for (; j + 4 <= count; j += 4) { /* four keys a pass over the query tile */
            const float *k0 = keys + (j0 + j) * h, *k1 = k0 + h, *k2 = k1 + h, *k3 = k2 + h;
            fvec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t d = 0; d < h; d++) {
                const fvec q = qt[d];
                a0 += q * k0[d], a1 += q * k1[d], a2 += q * k2[d], a3 += q * k3[d];
            }
            sc[j] = a0, sc[j + 1] = a1, sc[j + 2] = a2, sc[j + 3] = a3;
        }
        for (; j < count; j++) {
            const float* k0 = keys + (j0 + j) * h;
            fvec a0 = {0};
            for (int64_t d = 0; d < h; d++) a0 += qt[d] * k0[d];
            sc[j] = a0;
        }
        fvec top = (fvec){0} - 1e30f;
        for (j = 0; j < count; j++) {
            fvec x = sc[j];
            if (job->softcap > 0.0f) x = job->softcap * (2.0f * sigmoid_vec(x * (2.0f / job->softcap)) - 1.0f);
            const ivec at = (ivec){0} + (int32_t)(j0 + j);
            x = select_vec((at >= lo_v) & (at < hi_v), x, (fvec){0} - 1e30f);
            sc[j] = x;
            top = select_vec(x > top, x, top);
        }
        const fvec next = select_vec(top > m, top, m), factor = exp_vec(m - next);
        m = next;
        sum *= factor;
        for (int64_t d = 0; d < h; d++) acc[d] *= factor;
        for (j = 0; j < count; j++) {
            const fvec e = exp_vec(sc[j] - m);
            sc[j] = e;
            sum += e;
        }
        /* 8 accumulators at a time, in registers over the block: a constant count, since with a variable one
         * (the last group of a head not a multiple of 8 wide) they lived on the stack, each multiply-add stored
         * (perf over SmolLM2's 1536-token prefill: a third of this function's samples on those stores) */
        int64_t d0 = 0;
        for (; d0 + 8 <= h; d0 += 8) {
            fvec a[8];
            for (int t = 0; t < 8; t++) a[t] = acc[d0 + t];
            for (j = 0; j < count; j++) {
                const float* vj = values + (j0 + j) * h + d0;
                const fvec e = sc[j];
                for (int t = 0; t < 8; t++) a[t] += e * vj[t];
            }
            for (int t = 0; t < 8; t++) acc[d0 + t] = a[t];
        }
        for (; d0 < h; d0++) { /* a head's last dimensions past a multiple of 8, one at a time */
            fvec a = acc[d0];
            for (j = 0; j < count; j++) a += sc[j] * values[(j0 + j) * h + d0];
            acc[d0] = a;
        }
    }
    for (int64_t l = 0; l < n; l++) {
        const int64_t v = v0 + l, s = v / g_heads, head = g * g_heads + v % g_heads;
        float* y = job->out + (b * job->s + s) * job->nh * h + head * h;
        const float inv = 1.0f / sum[l];
        for (int64_t d = 0; d < h; d++) y[d] = acc[d][l] * inv;
    }
}

/* Few query vectors a KV head (a decode step: S * heads / KVH under VW): a unit per query head (its S rows), the
 * lanes over the head's dimensions, a key's score one dot product (summed across lanes); softmax over the row of
 * scores, VW keys at a time; then the values weighted into the output row. A lane per query vector would leave
 * most lanes idle, and a unit per KV head would split unevenly over the threads. */
FUSED_MULTIPLY_ADD static void attend_few_unit(void* data, size_t index) {
    const AttnJob* job = (const AttnJob*)data;
    const int64_t g_heads = job->nh / job->kvh, h = job->h, hv = h / VW * VW;
    const int64_t b = (int64_t)index / job->nh, head = (int64_t)index % job->nh, g = head / g_heads;
    const int64_t total = (int64_t)job->seqlens[b] + 1, past = attn_past(job, b);
    const int64_t width = (job->nh + 2 * job->kvh) * h;
    const float* keys = job->key + (b * job->kvh + g) * job->p * h;
    const float* values = job->value + (b * job->kvh + g) * job->p * h;
    float q[ATTN_MAX_HEAD], y[ATTN_MAX_HEAD];
    float* sc = job->scores + (int64_t)index * job->stride;
    for (int64_t s = 0; s < job->s; s++) {
        rotary(job, job->qkv + (b * job->s + s) * width + head * h, past + s, job->scale, q);
        const int64_t hi = past + s + 1 < total ? past + s + 1 : total;
        const int64_t lo = job->window > 0 && hi > job->window ? hi - job->window : 0, n = hi - lo;
        float top = -1e30f;
        for (int64_t j = 0; j < n; j++) {
            const float* kj = keys + (lo + j) * h;
            fvec acc = {0};
            for (int64_t c = 0; c < hv; c += VW) acc += *(const fvec*)(q + c) * *(const fvec*)(kj + c);
            float x = 0.0f;
            for (int l = 0; l < VW; l++) x += acc[l];
            for (int64_t c = hv; c < h; c++) x += q[c] * kj[c];
            if (job->softcap > 0.0f) x = job->softcap * tanhf(x / job->softcap);
            sc[j] = x;
            top = x > top ? x : top;
        }
        float sum = 0.0f;
        int64_t j = 0;
        for (; j + VW <= n; j += VW) {
            const fvec e = exp_vec(*(const fvec*)(sc + j) - top);
            *(fvec*)(sc + j) = e;
            for (int l = 0; l < VW; l++) sum += e[l];
        }
        for (; j < n; j++) sum += sc[j] = expf(sc[j] - top);
        for (int64_t c = 0; c < h; c++) y[c] = 0.0f;
        for (j = 0; j < n; j++) {
            const float* vj = values + (lo + j) * h;
            const float e = sc[j];
            for (int64_t c = 0; c < hv; c += VW) *(fvec*)(y + c) += e * *(const fvec*)(vj + c);
            for (int64_t c = hv; c < h; c++) y[c] += e * vj[c];
        }
        float* out = job->out + (b * job->s + s) * job->nh * h + head * h;
        const float inv = 1.0f / sum;
        for (int64_t c = 0; c < h; c++) out[c] = y[c] * inv;
    }
}

static OrtStatus* ORT_API_CALL attention_compute(void* kernel, OrtKernelContext* context) {
    const Kernel* k = (const Kernel*)kernel;
    const OrtValue* in[7];
    for (size_t i = 0; i < 7; i++) RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &in[i]));
    int64_t qd[8], kd[8], vd[8], sd[8], cd[8], nd[8];
    size_t qr, kr, vr, sr, cr, nr;
    RETURN_IF_ERROR(shape_of(in[0], qd, &qr));
    RETURN_IF_ERROR(shape_of(in[1], kd, &kr));
    RETURN_IF_ERROR(shape_of(in[2], vd, &vr));
    RETURN_IF_ERROR(shape_of(in[3], sd, &sr));
    RETURN_IF_ERROR(shape_of(in[5], cd, &cr));
    RETURN_IF_ERROR(shape_of(in[6], nd, &nr));
    AttnJob job = {0};
    job.nh = k->heads, job.kvh = k->kv_heads;
    if (qr != 3 || kr != 4 || vr != 4 || sr != 1 || cr != 2 || nr != 2)
        return invalid_argument("CacheAttention: qkv (B, S, D), caches (B, KVH, P, H), seqlens_k (B), cos/sin 2-D");
    job.batch = qd[0], job.s = qd[1];
    job.h = qd[2] / (job.nh + 2 * job.kvh);
    job.half = cd[1], job.positions = cd[0];
    if (job.h * (job.nh + 2 * job.kvh) != qd[2] || job.h > ATTN_MAX_HEAD || kd[0] != job.batch ||
        kd[1] != job.kvh || kd[3] != job.h || memcmp(kd, vd, sizeof(int64_t) * 4) || sd[0] != job.batch ||
        nd[0] != cd[0] || nd[1] != cd[1] || 2 * job.half > job.h)
        return invalid_argument("CacheAttention: shapes do not agree (or a head wider than 256)");
    const int32_t* total_len = (const int32_t*)data_of(in[4]);
    job.seqlens = (const int32_t*)data_of(in[3]);
    if (!total_len || (job.batch && !job.seqlens)) return invalid_argument("CacheAttention: no lengths");
    const int64_t total = *total_len, past_len = kd[2];
    job.first = job.s == total;
    if (!job.first && job.s != 1 && job.batch != 1)
        return invalid_argument("CacheAttention: a continued prompt of several tokens needs batch 1");
    job.p = past_len > total ? past_len : total;
    for (int64_t b = 0; b < job.batch; b++) {
        const int64_t t = (int64_t)job.seqlens[b] + 1;
        if (t < 1 || t > job.p || (!job.first && t < job.s) || attn_past(&job, b) + job.s > job.positions)
            return invalid_argument("CacheAttention: seqlens_k out of range of the cache or the cos/sin cache");
    }
    int64_t out_dims[3] = {job.batch, job.s, job.nh * job.h}, cache_dims[4] = {job.batch, job.kvh, job.p, job.h};
    OrtValue *out, *present_k, *present_v;
    RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, out_dims, 3, &out));
    RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 1, cache_dims, 4, &present_k));
    RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 2, cache_dims, 4, &present_v));
    job.out = (float*)data_of(out), job.key = (float*)data_of(present_k), job.value = (float*)data_of(present_v);
    job.qkv = (const float*)data_of(in[0]);
    job.cos = (const float*)data_of(in[5]), job.sin = (const float*)data_of(in[6]);
    const float* past_k = (const float*)data_of(in[1]);
    const float* past_v = (const float*)data_of(in[2]);
    if (job.batch * job.s == 0) return NULL;
    if (!job.out || !job.key || !job.value || !job.qkv || !job.cos || !job.sin)
        return invalid_argument("CacheAttention: an input has no data");
    const int64_t plane = job.p * job.h;
    if (job.key != past_k || job.value != past_v) /* not in place: the past copied, the rest zero */
        for (int64_t bg = 0; bg < job.batch * job.kvh; bg++) {
            float *pk = job.key + bg * plane, *pv = job.value + bg * plane;
            memset(pk, 0, sizeof(float) * (size_t)plane), memset(pv, 0, sizeof(float) * (size_t)plane);
            if (past_len && past_k && past_v)
                memcpy(pk, past_k + bg * past_len * job.h, sizeof(float) * (size_t)(past_len * job.h)),
                    memcpy(pv, past_v + bg * past_len * job.h, sizeof(float) * (size_t)(past_len * job.h));
        }
    job.scale = k->scale > 0.0f ? k->scale : 1.0f / sqrtf((float)job.h);
    job.softcap = k->softcap, job.window = k->window;
    const int64_t width = (job.nh + 2 * job.kvh) * job.h;
    for (int64_t b = 0; b < job.batch; b++) { /* the new keys (rotated) and values into the cache */
        const int64_t past = attn_past(&job, b);
        for (int64_t s = 0; s < job.s && past + s < job.p; s++) {
            const float* x = job.qkv + (b * job.s + s) * width;
            for (int64_t g = 0; g < job.kvh; g++) {
                const int64_t at = (b * job.kvh + g) * plane + (past + s) * job.h;
                rotary(&job, x + (job.nh + g) * job.h, past + s, 1.0f, job.key + at);
                memcpy(job.value + at, x + (job.nh + job.kvh + g) * job.h, sizeof(float) * (size_t)job.h);
            }
        }
    }
    job.per_head = (job.s * (job.nh / job.kvh) + VW - 1) / VW;
    const int few = job.s * (job.nh / job.kvh) < VW;
    void (*unit)(void*, size_t) = few ? attend_few_unit : attend_unit;
    const int64_t units = job.batch * (few ? job.nh : job.kvh * job.per_head);
    int64_t longest = 0;
    for (int64_t b = 0; b < job.batch; b++) longest = job.seqlens[b] + 1 > longest ? job.seqlens[b] + 1 : longest;
    if (few) { /* a row of scores per unit */
        job.stride = longest + VW;
        job.scores = (float*)malloc(sizeof(float) * (size_t)(units * job.stride));
        if (!job.scores) return g_api->CreateStatus(ORT_FAIL, "CacheAttention: out of memory");
    }
    /* over the pool even for a short step: measured faster than on the calling thread alone */
    OrtStatus* status = g_api->KernelContext_ParallelFor(context, unit, (size_t)units, 0, &job);
    free(job.scores);
    return status;
}

/* ---- the custom-op plumbing, shared by the ops ---------------------------------------------------------- */
typedef struct {
    OrtCustomOp op; /* first: onnxruntime hands this pointer back to the callbacks below */
    const char* name;
    size_t inputs, outputs; /* outputs: 0 stands for 1 */
    size_t optional;        /* inputs from this index on may be absent; 0: none */
    const ONNXTensorElementDataType* input_types;
    OrtStatus*(ORT_API_CALL* compute)(void*, OrtKernelContext*);
} Op;

static void ORT_API_CALL destroy_kernel(void* kernel) {
    if (kernel) free(((Kernel*)kernel)->blocks), free(((Kernel*)kernel)->signs);
    free(kernel);
}

static OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                             void** kernel) {
    (void)api;
    Kernel* k = (Kernel*)calloc(1, sizeof(Kernel));
    if (!k) return g_api->CreateStatus(ORT_FAIL, "pipeline kernels: out of memory");
    /* the rewrite's bound on |W| (exporters/cpu_kernels.py); a graph without it may use all 8 bits */
    OrtStatus* absent = g_api->KernelInfoGetAttribute_int64(info, "weight_max_abs", &k->weight_max_abs);
    if (absent) {
        g_api->ReleaseStatus(absent);
        k->weight_max_abs = 128;
    }
    int64_t K = 0;
    OrtStatus* status = NULL;
    const Op* o = (const Op*)op;
    if (o->compute == attention_compute) {
        OrtStatus* status_ = g_api->KernelInfoGetAttribute_int64(info, "num_heads", &k->heads);
        if (!status_) status_ = g_api->KernelInfoGetAttribute_int64(info, "kv_num_heads", &k->kv_heads);
        if (!status_ && (k->heads < 1 || k->kv_heads < 1 || k->heads % k->kv_heads))
            status_ = invalid_argument("CacheAttention: num_heads must be a multiple of kv_num_heads");
        if (status_) {
            destroy_kernel(k);
            return status_;
        }
        if ((absent = g_api->KernelInfoGetAttribute_float(info, "scale", &k->scale))) g_api->ReleaseStatus(absent);
        if ((absent = g_api->KernelInfoGetAttribute_float(info, "softcap", &k->softcap)))
            g_api->ReleaseStatus(absent);
        k->window = -1;
        if ((absent = g_api->KernelInfoGetAttribute_int64(info, "local_window_size", &k->window)))
            g_api->ReleaseStatus(absent);
        *kernel = k;
        return NULL;
    }
    if (o->compute == gated_compute) { /* the activation; a constant R that is a randomized Sylvester matrix */
        const OrtValue* r = NULL;
        int constant = 0;
        int64_t dims[8];
        size_t rank = 0;
        char activation[16] = "silu";
        size_t size = sizeof(activation);
        absent = g_api->KernelInfoGetAttribute_string(info, "activation", activation, &size);
        if (absent) { /* none: silu; a longer name than any it knows: refused below */
            g_api->ReleaseStatus(absent);
            if (size > sizeof(activation)) activation[0] = 0;
        }
        k->gelu = !strcmp(activation, "gelu_tanh");
        if (!k->gelu && strcmp(activation, "silu")) {
            destroy_kernel(k);
            return g_api->CreateStatus(ORT_INVALID_ARGUMENT, "GluRotate: activation is silu or gelu_tanh");
        }
        status = g_api->KernelInfoGetConstantInput_tensor(info, 1, &constant, &r);
        if (!status && constant && r) status = shape_of(r, dims, &rank);
        if (!status && constant && r && rank == 2 && dims[0] == dims[1] && data_of(r)) {
            k->signs = sylvester_signs((const float*)data_of(r), dims[0]);
            k->signs_b = dims[0];
        }
        if (status) {
            destroy_kernel(k);
            return status;
        }
        *kernel = k;
        return NULL;
    }
    absent = o->compute != compute ? g_api->KernelInfoGetAttribute_int64(info, "K", &K) : NULL;
    if (absent) { /* BlockInt8MatMul: stored 8-bit blocks, read in place */
        g_api->ReleaseStatus(absent);
        if (o->compute == gather_compute) status = invalid_argument("BlockGather needs the attributes K, bits and rows");
    } else if (o->compute == gather_compute) {
        const OrtValue* packed;
        status = read_segments(info, K, 0, k, &packed);
    } else if (K) {
        status = unpack_blocks(info, K, k);
    }
    if (status) {
        destroy_kernel(k);
        return status;
    }
    *kernel = k;
    return NULL;
}
static const char* ORT_API_CALL op_name(const OrtCustomOp* op) { return ((const Op*)op)->name; }
static const char* ORT_API_CALL op_provider(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }

static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp* op, size_t i) {
    return ((const Op*)op)->input_types[i];
}
static size_t ORT_API_CALL input_count(const OrtCustomOp* op) { return ((const Op*)op)->inputs; }
static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp* op, size_t i) {
    (void)op, (void)i;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL output_count(const OrtCustomOp* op) {
    return ((const Op*)op)->outputs ? ((const Op*)op)->outputs : 1;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp* op, size_t i) {
    (void)op, (void)i;
    return INPUT_OUTPUT_REQUIRED;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_required(const OrtCustomOp* op, size_t i) {
    const size_t from = ((const Op*)op)->optional;
    return from && i >= from ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL memory_type(const OrtCustomOp* op, size_t i) {
    (void)op, (void)i;
    return OrtMemTypeDefault;
}
static int ORT_API_CALL start_version(const OrtCustomOp* op) { (void)op; return 1; }
static int ORT_API_CALL end_version(const OrtCustomOp* op) { (void)op; return 2147483647; }

static const ONNXTensorElementDataType STATIC_INPUTS[6] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8};
static const ONNXTensorElementDataType BLOCK_INPUTS[4] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

static const ONNXTensorElementDataType GATHER_INPUTS[3] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
static const ONNXTensorElementDataType GATED_INPUTS[2] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                                          ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
static const ONNXTensorElementDataType ATTENTION_INPUTS[7] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

enum { OP_COUNT = 5 };
static Op g_ops[OP_COUNT] = {
    {.name = "StaticInt8MatMul", .inputs = 6, .input_types = STATIC_INPUTS, .compute = compute},
    {.name = "BlockInt8MatMul", .inputs = 4, .optional = 3, .input_types = BLOCK_INPUTS, .compute = block_compute},
    {.name = "BlockGather", .inputs = 3, .input_types = GATHER_INPUTS, .compute = gather_compute},
    {.name = "GluRotate", .inputs = 2, .input_types = GATED_INPUTS, .compute = gated_compute},
    {.name = "CacheAttention", .inputs = 7, .outputs = 3, .input_types = ATTENTION_INPUTS,
     .compute = attention_compute}};

static void fill_op(Op* o) {
    OrtCustomOp* op = &o->op;
    op->GetName = op_name;
    op->GetExecutionProviderType = op_provider;
    op->GetInputType = input_type;
    op->GetInputTypeCount = input_count;
    op->GetOutputType = output_type;
    op->GetOutputTypeCount = output_count;
    op->GetInputCharacteristic = input_required;
    op->GetOutputCharacteristic = required;
    op->GetInputMemoryType = memory_type;
    op->CreateKernelV2 = create_kernel;
    op->KernelComputeV2 = o->compute;
    op->KernelDestroy = destroy_kernel;
    op->GetStartVersion = start_version;
    op->GetEndVersion = end_version;
    op->version = ORT_API_VERSION;
}

/* The entry point onnxruntime looks up in a library given to SessionOptions.register_custom_ops_library. */
ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
    g_api = base->GetApi(ORT_API_VERSION);
    if (!g_api) /* an onnxruntime older than these headers; version 1 of the API has CreateStatus too */
        return base->GetApi(1)->CreateStatus(ORT_FAIL, "pipeline's kernels need onnxruntime >= 1.21");
    for (size_t i = 0; i < OP_COUNT; i++)
        if (g_ops[i].op.version == 0) fill_op(&g_ops[i]); /* once: sessions registered earlier keep pointing at it */
    OrtCustomOpDomain* domain;
    RETURN_IF_ERROR(g_api->CreateCustomOpDomain("com.pipeline", &domain));
    for (size_t i = 0; i < OP_COUNT; i++) RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &g_ops[i].op));
    return g_api->AddCustomOpDomain(options, domain); /* the domain lives as long as the process */
}
