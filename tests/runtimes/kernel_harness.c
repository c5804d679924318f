/* Exactness harness for runtimes/kernels/int8_matmul.c without onnxruntime: its quantize() and run_chunk(), the
 * whole compute path but the custom-op plumbing, against a scalar reference of the arithmetic the op stands for
 * (onnxruntime's QuantizeLinear, an exact int32 dot product, the float epilogue), compared bit for bit.
 * tests/runtimes/test_kernels.py builds it natively and for AArch64, which it runs under qemu. Prints "ok N" or
 * the first difference, and exits 1 on one. */
#include "int8_matmul.c"

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

static int check(int64_t m, int64_t k, int64_t n, int32_t zero_point, int64_t chunks) {
    const float x_scale = 0.03f;
    float* x = malloc(sizeof(float) * m * k);
    int8_t* w = malloc(k * n);
    int8_t* packed = malloc(k * n);
    float* w_scale = malloc(sizeof(float) * n);
    int32_t* colsum = calloc(n, sizeof(int32_t));
    uint8_t* xq = malloc(m * k);
    float* y = malloc(sizeof(float) * m * n);
    for (int64_t i = 0; i < k * n; i++) w[i] = (int8_t)(rnd() & 0xff);
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
               .x_zero_point = zero_point, .y = y, .m = m, .k = k, .n = n, .panels = n / 16};
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
                printf("m=%lld k=%lld n=%lld zero_point=%d: y[%lld, %lld] = %.9g, want %.9g\n", (long long)m,
                       (long long)k, (long long)n, (int)zero_point, (long long)r, (long long)nn, y[r * n + nn],
                       want);
                bad = 1;
            }
        }
    free(x), free(w), free(packed), free(w_scale), free(colsum), free(xq), free(y);
    return bad;
}

int main(void) {
    /* decode rows, blocks of 4 rows and remainders, panel counts that are not a multiple of 4, K with a
     * quantization tail (not a multiple of 16), every chunking of the panel groups */
    static const int64_t shapes[][3] = {{1, 576, 960}, {1, 36, 48}, {5, 64, 64}, {8, 100, 16}, {3, 1536, 80},
                                        {4, 4, 16}, {9, 12, 112}};
    static const int32_t zero_points[] = {0, 128, 255, 37};
    int cases = 0;
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
        for (size_t z = 0; z < sizeof(zero_points) / sizeof(zero_points[0]); z++)
            for (int64_t chunks = 1; chunks <= 16; chunks *= 4, cases++)
                if (check(shapes[s][0], shapes[s][1], shapes[s][2], zero_points[z], chunks)) return 1;
    printf("ok %d\n", cases);
    return 0;
}
