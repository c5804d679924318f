/* StaticInt8MatMul (domain com.pipeline): the static W8A8 MatMul of a QDQ graph as one onnxruntime custom op,
 * for x86-64 CPUs with AVX512-VNNI and AArch64 CPUs with the dot-product instructions (ARMv8.2 and later).
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
 * The packed layout suits both instruction sets: one 64-byte group is 16 columns x 4 consecutive k, which
 * AVX512-VNNI's vpdpbusd (u8 x s8) takes as one register and NEON's sdot (vdotq_s32, s8 x s8) as four, 4
 * columns each. NEON has no u8 x s8 dot product before i8mm, so on AArch64 the quantized activations are stored
 * minus 128 (as int8) and the zero point's correction becomes (zero_point - 128) * colsum: the same integers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#include <math.h>
#else
#error "StaticInt8MatMul needs x86-64 (AVX512-VNNI) or AArch64 with the dot product (-march=armv8.2-a+dotprod)"
#endif

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
    float* y;               /* (M, N) */
    int64_t m, k, n, panels, groups, chunks;
} Job;

#if defined(__x86_64__)
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

static OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* context) {
    (void)kernel;
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
    job.m = 1;
    for (size_t i = 0; i + 1 < x_rank; i++) job.m *= x_dims[i];
    int64_t y_dims[8];
    memcpy(y_dims, x_dims, sizeof(int64_t) * x_rank);
    y_dims[x_rank - 1] = job.n;
    OrtValue* y;
    RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, y_dims, x_rank, &y));
    job.y = (float*)data_of(y);
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

static OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                             void** kernel) {
    (void)op, (void)api, (void)info;
    *kernel = (void*)&g_api; /* stateless: every input is read at compute time */
    return NULL;
}

static void ORT_API_CALL destroy_kernel(void* kernel) { (void)kernel; }
static const char* ORT_API_CALL op_name(const OrtCustomOp* op) { (void)op; return "StaticInt8MatMul"; }
static const char* ORT_API_CALL op_provider(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }

static const ONNXTensorElementDataType INPUT_TYPES[6] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8};
static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp* op, size_t i) {
    (void)op;
    return INPUT_TYPES[i];
}
static size_t ORT_API_CALL input_count(const OrtCustomOp* op) { (void)op; return 6; }
static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp* op, size_t i) {
    (void)op, (void)i;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL output_count(const OrtCustomOp* op) { (void)op; return 1; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp* op, size_t i) {
    (void)op, (void)i;
    return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL memory_type(const OrtCustomOp* op, size_t i) {
    (void)op, (void)i;
    return OrtMemTypeDefault;
}
static int ORT_API_CALL start_version(const OrtCustomOp* op) { (void)op; return 1; }
static int ORT_API_CALL end_version(const OrtCustomOp* op) { (void)op; return 2147483647; }

static OrtCustomOp g_op;

static void fill_op(void) {
    g_op.GetName = op_name;
    g_op.GetExecutionProviderType = op_provider;
    g_op.GetInputType = input_type;
    g_op.GetInputTypeCount = input_count;
    g_op.GetOutputType = output_type;
    g_op.GetOutputTypeCount = output_count;
    g_op.GetInputCharacteristic = required;
    g_op.GetOutputCharacteristic = required;
    g_op.GetInputMemoryType = memory_type;
    g_op.CreateKernelV2 = create_kernel;
    g_op.KernelComputeV2 = compute;
    g_op.KernelDestroy = destroy_kernel;
    g_op.GetStartVersion = start_version;
    g_op.GetEndVersion = end_version;
    g_op.version = ORT_API_VERSION;
}

/* The entry point onnxruntime looks up in a library given to SessionOptions.register_custom_ops_library. */
ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
    g_api = base->GetApi(ORT_API_VERSION);
    if (!g_api) /* an onnxruntime older than these headers; version 1 of the API has CreateStatus too */
        return base->GetApi(1)->CreateStatus(ORT_FAIL, "StaticInt8MatMul needs onnxruntime >= 1.21");
    if (g_op.version == 0) fill_op(); /* once: sessions registered earlier keep pointing at it */
    OrtCustomOpDomain* domain;
    RETURN_IF_ERROR(g_api->CreateCustomOpDomain("com.pipeline", &domain));
    RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &g_op));
    return g_api->AddCustomOpDomain(options, domain); /* the domain lives as long as the process */
}
