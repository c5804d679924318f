/* Exactness harness for runtimes/kernels/int8_matmul.c without onnxruntime: its quantize() and run_chunk(), the
 * whole compute path but the custom-op plumbing, against a scalar reference of the arithmetic the op stands for
 * (onnxruntime's QuantizeLinear, an exact int32 dot product, the float epilogue), compared bit for bit; and
 * BlockInt8MatMul's block_quantize() and block_run_chunk() against a scalar reference of MatMulNBits' int8 path
 * (per-block activation codes compared exactly, outputs within float rounding of the sum over blocks); and
 * GluRotate's gated_run_chunk() against float64; CacheAttention's attend_unit() (prompt chunks) and
 * attend_few_unit() (decode steps) against float64, on a cache already written.
 * tests/runtimes/test_kernels.py builds it natively and for AArch64, which it runs under qemu. Prints "ok N" or
 * the first difference, and exits 1 on one. */
#include "int8_matmul.c"

#define _USE_MATH_DEFINES
#include <math.h>
#include <stdio.h>

static uint64_t state = 88172645463325252ull;

static uint32_t rnd(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (uint32_t)state;
}

static float uniform(void) { return (float)(rnd() >> 8) / 16777216.0f; } /* [0, 1) */

static uint8_t quantize_ref(float x, float scale, int32_t zero_point) {
    float f = x / scale;
    if (!(f >= (float)-zero_point)) f = (float)-zero_point; /* NaN to the low end, as onnxruntime */
    if (f > (float)(255 - zero_point)) f = (float)(255 - zero_point);
    return (uint8_t)((int32_t)nearbyintf(f) + zero_point);
}

static int check(int64_t m, int64_t k, int64_t n, int32_t zero_point, int64_t chunks, int narrow) {
    const float x_scale = 0.03f;
    float* x = malloc(sizeof(float) * m * k);
    int8_t* w = malloc(k * n);
    int8_t* packed = malloc(k * n);
    float* w_scale = malloc(sizeof(float) * n);
    int32_t* colsum = calloc(n, sizeof(int32_t));
    uint8_t* xq = malloc(m * k);
    float* y = malloc(sizeof(float) * m * n);
    for (int64_t i = 0; i < k * n; i++) w[i] = narrow ? (int8_t)((int32_t)(rnd() % 129) - 64) : (int8_t)(rnd() & 0xff);
    for (int64_t i = 0; i < n; i++) w_scale[i] = 1e-3f + 2e-2f * uniform();
    for (int64_t i = 0; i < m * k; i++) {
        x[i] = (uniform() - 0.5f) * 6.0f;
        if (i % 7 == 0) x[i] = (nearbyintf(x[i] / x_scale) + 0.5f) * x_scale; /* ties */
        if (i % 11 == 0) x[i] *= 100.0f;                                      /* saturates */
        if (i % 13 == 1) x[i] = 1e12f;                                        /* past int32 */
        if (i % 17 == 2) x[i] = -INFINITY;
        if (i % 19 == 3) x[i] = NAN;
    }
    for (int64_t kk = 0; kk < k; kk++) /* W[4g + t, 16p + c] at [p, g, 4c + t] */
        for (int64_t nn = 0; nn < n; nn++) {
            packed[((nn / 16) * (k / 4) + kk / 4) * 64 + 4 * (nn % 16) + kk % 4] = w[kk * n + nn];
            colsum[nn] += w[kk * n + nn];
        }
    Job job = {.xq = xq, .w = packed, .w_scale = w_scale, .colsum = colsum, .x_scale = x_scale,
               .x_zero_point = zero_point, .narrow = narrow, .y = y, .m = m, .k = k, .n = n, .panels = n / 16};
    job.groups = (job.panels + 3) / 4;
    job.chunks = chunks < job.groups ? chunks : job.groups;
    quantize(x, xq, m * k, x_scale, zero_point);
    for (int64_t c = 0; c < job.chunks; c++) run_chunk(&job, (size_t)c);
    int bad = 0;
    for (int64_t r = 0; r < m && !bad; r++)
        for (int64_t nn = 0; nn < n && !bad; nn++) {
            int32_t acc = 0;
            for (int64_t kk = 0; kk < k; kk++)
                acc += ((int32_t)quantize_ref(x[r * k + kk], x_scale, zero_point) - zero_point) * w[kk * n + nn];
            const float want = (float)acc * (x_scale * w_scale[nn]);
            if (memcmp(&want, &y[r * n + nn], sizeof(float)) != 0) {
                printf("m=%lld k=%lld n=%lld zero_point=%d narrow=%d: y[%lld, %lld] = %.9g, want %.9g\n",
                       (long long)m, (long long)k, (long long)n, (int)zero_point, narrow, (long long)r,
                       (long long)nn, y[r * n + nn], want);
                bad = 1;
            }
        }
    free(x), free(w), free(packed), free(w_scale), free(colsum), free(xq), free(y);
    return bad;
}

/* BlockInt8MatMul: y[r, n] against the reference sum over blocks of w_scale * a_scale * exact integer dot, with
 * the activation codes the reference quantizer gives (amax / 127 scale, 127 / amax multiplier, half to even). */
static int check_block(int64_t m, int64_t kb, int64_t n, int64_t chunks) {
    const int64_t k = kb * BLOCK;
    float* x = malloc(sizeof(float) * m * k);
    uint8_t* w = malloc(n * k);
    float* w_scale = malloc(sizeof(float) * n * kb);
    int8_t* aq = malloc(m * k);
    float* a_scale = malloc(sizeof(float) * m * kb);
    float* y = malloc(sizeof(float) * m * n);
    for (int64_t i = 0; i < n * k; i++) w[i] = (uint8_t)(rnd() & 0xff);
    for (int64_t i = 0; i < n * kb; i++) w_scale[i] = 1e-3f + 2e-2f * uniform();
    for (int64_t i = 0; i < m * k; i++) x[i] = (uniform() - 0.5f) * 6.0f * (1 + (i / BLOCK) % 5);
    for (int64_t i = 0; i < BLOCK && kb > 1; i++) x[BLOCK + i] = 0.0f; /* an all-zero block: scale 0 */
#if KERNEL_AVX512
    int32_t* a_corr = malloc(sizeof(int32_t) * m * ((kb + 1) / 2) * 16);
    block_quantize(x, m, kb, aq, a_scale, a_corr);
    BlockJob job = {.aq = aq, .a_scale = a_scale, .a_corr = a_corr, .w = w, .w_scale = w_scale, .y = y, .m = m,
                    .kb = kb, .n = n, .chunks = chunks < n ? chunks : n};
#else
    block_quantize(x, m, kb, aq, a_scale);
    BlockJob job = {.aq = aq, .a_scale = a_scale, .w = w, .w_scale = w_scale, .y = y, .m = m, .kb = kb, .n = n,
                    .chunks = chunks < n ? chunks : n};
#endif
    for (int64_t c = 0; c < job.chunks; c++) block_run_chunk(&job, (size_t)c);
    int bad = 0;
    for (int64_t b = 0; b < m * kb && !bad; b++) {
        float amax = 0.0f;
        for (int i = 0; i < BLOCK; i++) amax = fmaxf(amax, fabsf(x[b * BLOCK + i]));
        const float inverse = amax != 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < BLOCK && !bad; i++)
            if (aq[b * BLOCK + i] != (int8_t)nearbyintf(x[b * BLOCK + i] * inverse) || a_scale[b] != amax / 127.0f) {
                printf("m=%lld kb=%lld: activation code %lld differs\n", (long long)m, (long long)kb,
                       (long long)(b * BLOCK + i));
                bad = 1;
            }
    }
    for (int64_t r = 0; r < m && !bad; r++)
        for (int64_t nn = 0; nn < n && !bad; nn++) {
            double want = 0.0, magnitude = 0.0;
            for (int64_t b = 0; b < kb; b++) {
                /* in double (exact: integers under 2^53): GCC 12 at -O3 vectorizes the int32 form of this sum,
                 * (uint8 - 128) * int8, into wrong code for AVX512-VNNI */
                double dot = 0.0, bound = 0.0; /* bound: what the kernel's integer partial sums can reach */
                for (int i = 0; i < BLOCK; i++) {
                    const double a = aq[(r * kb + b) * BLOCK + i];
                    dot += ((double)w[(nn * kb + b) * BLOCK + i] - 128.0) * a;
                    bound += ((double)w[(nn * kb + b) * BLOCK + i] + 128.0) * fabs(a);
                }
                const double scale = (double)w_scale[nn * kb + b] * a_scale[r * kb + b];
                want += dot * scale, magnitude += bound * scale;
            }
            if (fabs(y[r * n + nn] - want) > 1e-6 * magnitude + 1e-30) {
                printf("block m=%lld kb=%lld n=%lld: y[%lld, %lld] = %.9g, want %.9g\n", (long long)m, (long long)kb,
                       (long long)n, (long long)r, (long long)nn, y[r * n + nn], want);
                bad = 1;
            }
        }
#if KERNEL_AVX512
    free(a_corr);
#endif
    free(x), free(w), free(w_scale), free(aq), free(a_scale), free(y);
    return bad;
}

/* Rows kept narrow against the same codes a byte each, one segment of them between 8-bit ones: the x86-64 builds'
 * 5-bit rows (five_pack_row's layout) and every build's 4-bit rows (four_pack_row's); a decode row's outputs
 * equal to the bit (the same int32 lanes, summed in the same order). */
static int check_kept(int64_t m, int64_t kb, int64_t n, int64_t chunks, int width) {
    const int64_t k = kb * BLOCK, before = n / 3, narrow = n - 2 * (n / 3), after = n / 3;
    float* x = malloc(sizeof(float) * m * k);
    uint8_t* w = malloc(n * k);
    float* w_scale = malloc(sizeof(float) * n * kb);
    int8_t* aq = malloc(m * k);
    float* a_scale = malloc(sizeof(float) * m * kb);
#if KERNEL_FIVE
    uint8_t* scratch = malloc(16 * KEPT_ROWS * k);
#else
    uint8_t* scratch = NULL;
#endif
    float* want = malloc(sizeof(float) * m * n);
    float* got = malloc(sizeof(float) * m * n);
    const int offset = 128 - (1 << (width - 1)); /* the narrow rows' bytes are c + 112 (5 bits) or c + 120 (4) */
    for (int64_t i = 0; i < n * k; i++)
        w[i] = i / k >= before && i / k < before + narrow ? (uint8_t)(offset + rnd() % (1u << width))
                                                         : (uint8_t)(rnd() & 0xff);
    for (int64_t i = 0; i < n * kb; i++) w_scale[i] = 1e-3f + 2e-2f * uniform();
    for (int64_t i = 0; i < m * k; i++) x[i] = (uniform() - 0.5f) * 6.0f * (1 + (i / BLOCK) % 5);
    for (int64_t i = 0; i < k; i++) x[(m - 1) * k + i] *= (i / BLOCK) % 3 == 1 ? 0.0f : 1.0f; /* zero blocks */
    Kernel kernel = {.n = n, .kb = kb, .any_kept = 1};
    kernel.seg.count = 3;
    const int64_t rows[3] = {before, narrow, after};
    int64_t total = 0;
    for (int s = 0; s < 3; s++) {
        kernel.seg.bits[s] = s == 1 ? width : 8, kernel.seg.rows[s] = rows[s];
        kernel.kept[s] = (unsigned char)(s == 1 ? width : 0);
        kernel.offset[s] = total;
        total += rows[s] * kept_row_bytes(kernel.kept[s], kb);
    }
    kernel.blocks = malloc(total);
    memcpy(kernel.blocks, w, before * k);
    for (int64_t r = 0; r < narrow; r++) {
        uint8_t* out = kernel.blocks + kernel.offset[1] + r * kept_row_bytes(width, kb);
#if KERNEL_FIVE
        if (width == 5) {
            five_pack_row(w + (before + r) * k, kb, out);
            continue;
        }
#endif
        four_pack_row(w + (before + r) * k, kb, out);
    }
    memcpy(kernel.blocks + kernel.offset[2], w + (before + narrow) * k, after * k);
    BlockJob plain = {.aq = aq, .a_scale = a_scale, .w = w, .w_scale = w_scale, .y = want, .m = m, .kb = kb, .n = n,
                      .chunks = chunks < n ? chunks : n};
#if KERNEL_AVX512
    int32_t* a_corr = malloc(sizeof(int32_t) * m * ((kb + 1) / 2) * 16);
    block_quantize(x, m, kb, aq, a_scale, a_corr);
    plain.a_corr = a_corr;
#elif KERNEL_AVX2
    int16_t* a_pair16 = malloc(sizeof(int16_t) * m * kb * 16);
    block_quantize(x, m, kb, aq, a_scale);
    five_pair_sums(aq, (size_t)(m * kb), a_pair16);
#else
    block_quantize(x, m, kb, aq, a_scale);
#endif
    BlockJob kept = plain;
    kept.y = got, kept.packed = &kernel;
#if KERNEL_FIVE
    kept.scratch = scratch;
#endif
#if KERNEL_AVX2
    kept.a_pair16 = a_pair16;
#endif
    for (int64_t c = 0; c < plain.chunks; c++) block_run_chunk(&plain, (size_t)c), block_run_chunk(&kept, (size_t)c);
    /* one activation row: equal to the bit; a prompt's: rows pair up from each segment's start, so a row may be
     * summed by the other tile shape, within float rounding of the sum over blocks */
    int bad = 0;
    for (int64_t i = 0; i < m * n && !bad; i++) {
        const int64_t r = i / n, row = i % n;
        double magnitude = 0.0;
        for (int64_t b = 0; b < kb; b++) {
            double bound = 0.0;
            for (int c = 0; c < BLOCK; c++)
                bound += fabs((double)w[(row * kb + b) * BLOCK + c] - 128.0) * fabs((double)aq[(r * kb + b) * BLOCK + c]);
            magnitude += bound * w_scale[row * kb + b] * a_scale[r * kb + b];
        }
        if (m == 1 ? memcmp(&got[i], &want[i], sizeof(float)) != 0 : fabs(got[i] - want[i]) > 1e-6 * magnitude) {
            printf("%d-bit m=%lld kb=%lld n=%lld: y[%lld] = %.9g, as bytes %.9g\n", width, (long long)m,
                   (long long)kb,
                   (long long)n, (long long)i, got[i], want[i]);
            bad = 1;
        }
    }
#if KERNEL_AVX512
    free(a_corr);
#elif KERNEL_AVX2
    free(a_pair16);
#endif
    free(x), free(w), free(w_scale), free(aq), free(a_scale), free(scratch), free(want), free(got);
    free(kernel.blocks);
    return bad;
}

/* GluRotate's gated_run_chunk(): y = (act(gate) * up) in blocks of b times R, against float64, within 4e-6
 * of the output's largest magnitude; R a randomized Sylvester matrix (the fast transform, sylvester_signs must
 * find it) or a dense one, gates past the exponential's clamp included. */
static int check_gated(int64_t m, int64_t f, int64_t b, int sylvester, int64_t chunks, int gelu) {
    float* x = malloc(sizeof(float) * m * 2 * f);
    float* r = malloc(sizeof(float) * b * b);
    float* y = malloc(sizeof(float) * m * f);
    float* h = malloc(sizeof(float) * chunks * ROT_ROWS * f);
    double* want = malloc(sizeof(double) * m * f);
    for (int64_t i = 0; i < m * 2 * f; i++) x[i] = (uniform() - 0.5f) * 12.0f;
    x[0] = -200.0f, x[f > 1 ? 1 : 0] = 200.0f;
    for (int64_t i = 0; i < b; i++)
        for (int64_t j = 0; j < b; j++)
            r[i * b + j] = sylvester ? (rnd() % 2 && j == 0 ? -1.0f : 1.0f) : uniform() - 0.5f;
    if (sylvester) /* column 0 holds the signs; the rest of each row follows Sylvester's pattern, scaled */
        for (int64_t i = 0; i < b; i++) {
            const float d = r[i * b] / sqrtf((float)b);
            for (int64_t j = 0; j < b; j++)
                r[i * b + j] = __builtin_popcountll((unsigned long long)(i & j)) % 2 ? -d : d;
        }
    float* signs = sylvester_signs(r, b);
    if (!sylvester != !signs) {
        printf("gated b=%lld: the Sylvester matrix %s\n", (long long)b, sylvester ? "was not found" : "was claimed");
        return 1;
    }
    double scale = 0.0, *hd = malloc(sizeof(double) * f);
    for (int64_t q = 0; q < m; q++) {
        for (int64_t i = 0; i < f; i++) {
            const double g = x[q * 2 * f + i], u = x[q * 2 * f + f + i];
            hd[i] = (gelu ? 0.5 * g * (1.0 + tanh(sqrt(2.0 / M_PI) * (g + 0.044715 * g * g * g))) : g / (1.0 + exp(-g)))
                    * u;
        }
        for (int64_t c = 0; c < f; c += b)
            for (int64_t j = 0; j < b; j++) {
                double sum = 0.0;
                for (int64_t i = 0; i < b; i++) sum += hd[c + i] * r[i * b + j];
                want[q * f + c + j] = sum;
                scale = fabs(sum) > scale ? fabs(sum) : scale;
            }
    }
    free(hd);
    GatedJob job = {.x = x, .r = r, .y = y, .h = signs ? NULL : h, .signs = signs, .m = m, .f = f, .b = b,
                    .chunks = chunks, .gelu = gelu};
    for (int64_t c = 0; c < chunks; c++) gated_run_chunk(&job, (size_t)c);
    int bad = 0;
    for (int64_t i = 0; i < m * f && !bad; i++)
        if (!(fabs(y[i] - want[i]) <= 4e-6 * scale)) {
            printf("gated m=%lld f=%lld b=%lld gelu=%d: y[%lld] = %.9g, want %.9g\n", (long long)m, (long long)f,
                   (long long)b, gelu, (long long)i, y[i], want[i]);
            bad = 1;
        }
    free(x), free(r), free(y), free(h), free(want), free(signs);
    return bad;
}

/* CacheAttention's units on a cache already written (the op writes it first), against float64: batch rows of
 * different lengths continuing their caches, the rotary over the first 2 * half dimensions, scale, window and
 * soft-cap as the op's attributes give them. */
static int check_attention(int64_t batch, int64_t s, int64_t nh, int64_t kvh, int64_t h, int64_t half,
                           int64_t window, float softcap) {
    const int64_t p = 96, width = (nh + 2 * kvh) * h, positions = 128;
    float* qkv = malloc(sizeof(float) * batch * s * width);
    float* key = malloc(sizeof(float) * batch * kvh * p * h);
    float* value = malloc(sizeof(float) * batch * kvh * p * h);
    float* cs = malloc(sizeof(float) * positions * half);
    float* sn = malloc(sizeof(float) * positions * half);
    float* out = malloc(sizeof(float) * batch * s * nh * h);
    int32_t seqlens[4];
    for (int64_t i = 0; i < batch * s * width; i++) qkv[i] = (uniform() - 0.5f) * 4.0f;
    for (int64_t i = 0; i < batch * kvh * p * h; i++) key[i] = (uniform() - 0.5f) * 4.0f, value[i] = uniform() - 0.5f;
    for (int64_t i = 0; i < positions * half; i++) {
        const float a = uniform() * 6.0f;
        cs[i] = cosf(a), sn[i] = sinf(a);
    }
    for (int64_t b = 0; b < batch; b++) seqlens[b] = (int32_t)(s + 20 + 17 * b - 1);
    AttnJob job = {.qkv = qkv, .key = key, .value = value, .out = out, .cos = cs, .sin = sn, .seqlens = seqlens,
                   .batch = batch, .s = s, .nh = nh, .kvh = kvh, .h = h, .p = p, .half = half,
                   .positions = positions, .scale = 1.0f / sqrtf((float)h) * 1.5f, .softcap = softcap,
                   .window = window};
    const int64_t g_heads = nh / kvh, few = s * g_heads < VW;
    job.per_head = (s * g_heads + VW - 1) / VW;
    job.stride = p + VW;
    job.scores = malloc(sizeof(float) * batch * nh * job.stride);
    const int64_t units = batch * (few ? nh : kvh * job.per_head);
    for (int64_t u = units - 1; u >= 0; u--) (few ? attend_few_unit : attend_unit)(&job, (size_t)u);
    int bad = 0;
    double* q = malloc(sizeof(double) * h), *sc = malloc(sizeof(double) * p), *y = malloc(sizeof(double) * h);
    for (int64_t b = 0; b < batch && !bad; b++)
        for (int64_t r = 0; r < s && !bad; r++)
            for (int64_t head = 0; head < nh && !bad; head++) {
                const int64_t pos = seqlens[b] + 1 - s + r, g = head / g_heads, hi = pos + 1;
                const int64_t lo = window > 0 && hi > window ? hi - window : 0;
                const float* x = qkv + (b * s + r) * width + head * h;
                for (int64_t i = 0; i < h; i++) q[i] = x[i];
                for (int64_t i = 0; i < half; i++) {
                    const double c = cs[pos * half + i], n = sn[pos * half + i];
                    q[i] = x[i] * c - x[i + half] * n, q[i + half] = x[i + half] * c + x[i] * n;
                }
                double top = -1e300, sum = 0.0;
                for (int64_t j = lo; j < hi; j++) {
                    double d = 0.0;
                    for (int64_t i = 0; i < h; i++) d += q[i] * key[((b * kvh + g) * p + j) * h + i];
                    d *= job.scale;
                    if (softcap > 0.0f) d = softcap * tanh(d / softcap);
                    sc[j] = d, top = d > top ? d : top;
                }
                for (int64_t i = 0; i < h; i++) y[i] = 0.0;
                for (int64_t j = lo; j < hi; j++) {
                    const double e = exp(sc[j] - top);
                    sum += e;
                    for (int64_t i = 0; i < h; i++) y[i] += e * value[((b * kvh + g) * p + j) * h + i];
                }
                for (int64_t i = 0; i < h && !bad; i++) {
                    const double want = y[i] / sum, got = out[(b * s + r) * nh * h + head * h + i];
                    if (!(fabs(got - want) <= 2e-6)) {
                        printf("attention b=%lld s=%lld head=%lld (h=%lld, window=%lld, softcap=%g): out[%lld] = "
                               "%.9g, want %.9g\n", (long long)b, (long long)r, (long long)head, (long long)h,
                               (long long)window, softcap, (long long)i, got, want);
                        bad = 1;
                    }
                }
            }
    free(q), free(sc), free(y), free(qkv), free(key), free(value), free(cs), free(sn), free(out), free(job.scores);
    return bad;
}

int main(void) {
    /* decode rows, blocks of 4 rows and remainders, panel counts that are not a multiple of 4, K with a
     * quantization tail (not a multiple of 16), every chunking of the panel groups; full 8-bit weights and
     * 7-bit ones (|W| <= 64, which the AVX2 build sums in int16 pairs), -64 and 64 included */
    static const int64_t shapes[][3] = {{1, 576, 960}, {1, 36, 48}, {5, 64, 64}, {8, 100, 16}, {3, 1536, 80},
                                        {4, 4, 16}, {9, 12, 112}};
    static const int32_t zero_points[] = {0, 128, 255, 37};
    int cases = 0;
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
        for (size_t z = 0; z < sizeof(zero_points) / sizeof(zero_points[0]); z++)
            for (int64_t chunks = 1; chunks <= 16; chunks *= 4)
                for (int narrow = 0; narrow < 2; narrow++, cases++)
                    if (check(shapes[s][0], shapes[s][1], shapes[s][2], zero_points[z], chunks, narrow)) return 1;
    /* BlockInt8MatMul: one activation row (block_row) and several (block_rows), odd block counts (a single-block
     * last pair; an odd pair count, whose last step has no partner), more than 16 blocks (the scale vectors
     * reload), row counts that are not a multiple of 4 (nor of 2), prompts longer than the AVX2 build's tiles of
     * 64 activation rows, every chunking */
    static const int64_t block_shapes[][3] = {{1, 20, 64}, {1, 1, 5}, {3, 3, 37}, {2, 18, 9}, {5, 33, 70},
                                              {1, 64, 19}, {1, 33, 7}, {1, 3, 6}, {1, 5, 11}, {131, 3, 7}};
    for (size_t s = 0; s < sizeof(block_shapes) / sizeof(block_shapes[0]); s++)
        for (int64_t chunks = 1; chunks <= 16; chunks *= 4, cases++)
            if (check_block(block_shapes[s][0], block_shapes[s][1], block_shapes[s][2], chunks)) return 1;
    printf("ok %d\n", cases);
    /* whole groups of 8 blocks and every tail (1 to 7 blocks), decode and prompt rows (an odd count: the last
     * row decoded alone), every chunking; segments of 1 row or more */
    static const int64_t five_shapes[][3] = {{1, 8, 9}, {1, 18, 7}, {1, 3, 3}, {1, 1, 5}, {3, 21, 10}, {2, 7, 8},
                                             {1, 48, 31}, {67, 13, 6}, {1, 5, 4}, {4, 6, 12}, {1, 4, 3}, {1, 2, 3}};
    for (int width = KERNEL_FIVE ? 5 : 4; width >= 4; width--) {
        int kept = 0;
        for (size_t s = 0; s < sizeof(five_shapes) / sizeof(five_shapes[0]); s++)
            for (int64_t chunks = 1; chunks <= 16; chunks *= 4, kept++)
                if (check_kept(five_shapes[s][0], five_shapes[s][1], five_shapes[s][2], chunks, width)) return 1;
        printf("ok %d-bit %d\n", width, kept);
    }
    /* GluRotate, silu and GELU's tanh form in turn: one row and prompts (tiles of 4 rows and what is left), the
     * fast transform below, at and above each build's vector width, dense blocks that take the 4-row tile, the
     * one-row tile, or none; no rotation */
    static const int64_t gated_shapes[][4] = {{1, 1536, 128, 1}, {7, 256, 128, 1}, {3, 64, 64, 1}, {5, 32, 8, 1},
                                              {2, 8, 2, 1}, {5, 4096, 4096, 1}, {1, 256, 128, 0}, {6, 192, 96, 0},
                                              {4, 48, 12, 0}, {3, 80, 1, 0}};
    int gated = 0;
    for (size_t s = 0; s < sizeof(gated_shapes) / sizeof(gated_shapes[0]); s++)
        for (int64_t chunks = 1; chunks <= 2; chunks++, gated++)
            if (check_gated(gated_shapes[s][0], gated_shapes[s][1], gated_shapes[s][2], (int)gated_shapes[s][3],
                            chunks < gated_shapes[s][0] ? chunks : 1, (int)(s % 2)))
                return 1;
    printf("ok gated %d\n", gated);
    /* CacheAttention: decode steps (a few query vectors a KV head) and prompt chunks (lanes of query vectors,
     * keys in blocks of 64 and a tail), heads of 32 to 256 with partial rotary, windows and soft-capping */
    static const int64_t attention_shapes[][6] = {{2, 1, 9, 3, 64, 32}, {1, 40, 9, 3, 64, 32}, {2, 7, 4, 1, 256, 128},
                                                  {1, 1, 4, 2, 32, 8}, {3, 17, 2, 2, 32, 16}};
    int attentions = 0;
    for (size_t a = 0; a < sizeof(attention_shapes) / sizeof(attention_shapes[0]); a++)
        for (int variant = 0; variant < 3; variant++, attentions++) {
            const int64_t* d = attention_shapes[a];
            if (check_attention(d[0], d[1], d[2], d[3], d[4], d[5], variant == 1 ? 9 : -1, variant == 2 ? 3.0f : 0.0f))
                return 1;
        }
    printf("ok attention %d\n", attentions);
    return 0;
}
