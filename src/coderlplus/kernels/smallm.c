/* fp32 kernels for a decode step of a few rows, single-threaded (AVX2 + FMA).
 *
 * smallm_linear: y = x w^T (+ b). x: M x K, w: N x K (the nn.Linear layout, used as it is: no
 * packing), y: M rows of ldy floats (N of them written: a column block of a wider output).
 * For each row of w (K floats, kept in L1) every row of x is multiplied in blocks of 8, 4, 2
 * and 1 rows; each block keeps one 8-wide accumulator per x row in a register, so a weight
 * vector loaded once feeds up to 8 fused multiply-adds. The weight rows stream from memory
 * once per call, the next row prefetched while this one is used.
 * Built and loaded by smallm.py.
 */
#include <immintrin.h>
#include <math.h>

#define PREFETCH_BYTES 2048

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y[m0 .. m0+R) [n] for one weight row wr; R is a constant in every expansion. */
#define ROW_BLOCK(R)                                                                      \
    static inline void block##R(const float *x, const float *wr, float bias, float *y,    \
                                long m0, long ldy, long K, long n) {                        \
        __m256 acc[R];                                                                    \
        for (int i = 0; i < R; i++) acc[i] = _mm256_setzero_ps();                         \
        long k = 0;                                                                       \
        for (; k + 8 <= K; k += 8) {                                                      \
            __m256 wv = _mm256_loadu_ps(wr + k);                                          \
            _mm_prefetch((const char *)(wr + k) + PREFETCH_BYTES, _MM_HINT_T0);          \
            for (int i = 0; i < R; i++)                                                   \
                acc[i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (m0 + i) * K + k), acc[i]); \
        }                                                                                 \
        for (int i = 0; i < R; i++) {                                                     \
            float s = hsum(acc[i]);                                                       \
            for (long t = k; t < K; t++) s += wr[t] * x[(m0 + i) * K + t];                \
            y[(m0 + i) * ldy + n] = s + bias;                                             \
        }                                                                                 \
    }

ROW_BLOCK(8)
ROW_BLOCK(4)
ROW_BLOCK(2)
ROW_BLOCK(1)

void smallm_linear(const float *x, const float *w, const float *b, float *y, long M, long N, long K, long ldy) {
    for (long n = 0; n < N; n++) {
        const float *wr = w + n * K;
        float bias = b ? b[n] : 0.0f;
        long m = 0;
        for (; m + 8 <= M; m += 8) block8(x, wr, bias, y, m, ldy, K, n);
        if (m + 4 <= M) { block4(x, wr, bias, y, m, ldy, K, n); m += 4; }
        if (m + 2 <= M) { block2(x, wr, bias, y, m, ldy, K, n); m += 2; }
        if (m < M) block1(x, wr, bias, y, m, ldy, K, n);
    }
}

/* sum_j a[j] * b[j], 8 lanes at a time */
static inline float dot(const float *a, const float *b, long n) {
    __m256 acc = _mm256_setzero_ps();
    long j = 0;
    for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    float s = hsum(acc);
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

/* out[b] = x[b] / sqrt(mean(x[b]^2) + eps) * w, rows of n floats (Qwen2RMSNorm in fp32). */
static void rms_norm(const float *x, const float *w, float *out, long B, long n, float eps) {
    for (long b = 0; b < B; b++) {
        const float *xr = x + b * n;
        float r = 1.0f / sqrtf(dot(xr, xr, n) / (float)n + eps);
        for (long i = 0; i < n; i++) out[b * n + i] = w[i] * (xr[i] * r);
    }
}

/* One head vector rotated in place: v*cos + roll(v, d/2)*sin (sin negated on the first half). */
static void rotate(float *v, const float *cos, const float *sin, long d) {
    float tmp[1024];
    long h = d / 2;
    for (long j = 0; j < d; j++) tmp[j] = v[j] * cos[j] + v[(j + h) % d] * sin[j];
    for (long j = 0; j < d; j++) v[j] = tmp[j];
}

/* One decoder layer (Qwen2/Llama, fp32) for one new token of each of B rows, as
 * fast_decode.FastDecoder._forward computes it with L = 1:
 *   h = rmsnorm(x) -> q, k, v (+ biases) -> rotary on q, k -> k, v into the caches at slot
 *   `start` -> attention of each query head over the slots s <= start with mask[b, s] set
 *   (grouped: kv head = head / (H / KV)), scale 1/sqrt(d) -> x += o(att);
 *   x += down(silu(gate(rmsnorm(x))) * up(rmsnorm(x))).
 * x: B x hidden, updated in place. Caches: B x KV x S x d. mask: B x S bytes. cos/sin: B x d.
 * scratch: B * (hidden + (H + 2 KV) d + H d + 3 inter) + S floats. Returns 0, or -1 when
 * d > 1024 (the caller checks first). */
int smallm_decode_layer(long B, long hidden, long H, long KV, long d, long inter, long S, long start,
                        float eps, float *x, const float *norm1, const float *wq, const float *wk,
                        const float *wv, const float *bq, const float *bk, const float *bv,
                        const float *wo, const float *norm2, const float *wg, const float *wu,
                        const float *wd, const float *cos, const float *sin, float *kcache,
                        float *vcache, const unsigned char *mask, float *scratch) {
    if (d > 1024) return -1;
    long nq = H * d, nkv = KV * d, nqkv = nq + 2 * nkv;
    float *h = scratch;                 /* B x hidden */
    float *qkv = h + B * hidden;        /* B x nqkv */
    float *att = qkv + B * nqkv;        /* B x nq */
    float *gu = att + B * nq;           /* B x 2 inter */
    float *act = gu + B * 2 * inter;    /* B x inter */
    float *p = act + B * inter;         /* S */
    float scale = 1.0f / sqrtf((float)d);

    rms_norm(x, norm1, h, B, hidden, eps);
    smallm_linear(h, wq, bq, qkv, B, nq, hidden, nqkv);
    smallm_linear(h, wk, bk, qkv + nq, B, nkv, hidden, nqkv);
    smallm_linear(h, wv, bv, qkv + nq + nkv, B, nkv, hidden, nqkv);
    for (long b = 0; b < B; b++) {
        float *row = qkv + b * nqkv;
        for (long hd = 0; hd < H + KV; hd++) rotate(row + hd * d, cos + b * d, sin + b * d, d);
        for (long g = 0; g < KV; g++) {
            float *kdst = kcache + ((b * KV + g) * S + start) * d;
            float *vdst = vcache + ((b * KV + g) * S + start) * d;
            for (long j = 0; j < d; j++) {
                kdst[j] = row[nq + g * d + j];
                vdst[j] = row[nq + nkv + g * d + j];
            }
        }
        const unsigned char *mrow = mask + b * S;
        for (long hd = 0; hd < H; hd++) {
            const float *q = row + hd * d;
            long g = hd / (H / KV);
            const float *keys = kcache + (b * KV + g) * S * d;
            const float *vals = vcache + (b * KV + g) * S * d;
            float mx = -INFINITY;
            for (long s = 0; s <= start; s++) {
                if (!mrow[s]) continue;
                p[s] = dot(q, keys + s * d, d) * scale;
                if (p[s] > mx) mx = p[s];
            }
            float sum = 0.0f;
            for (long s = 0; s <= start; s++) {
                if (!mrow[s]) continue;
                p[s] = expf(p[s] - mx);
                sum += p[s];
            }
            float *o = att + b * nq + hd * d;
            for (long j = 0; j < d; j++) o[j] = 0.0f;
            for (long s = 0; s <= start; s++) {
                if (!mrow[s]) continue;
                float ps = p[s] / sum;
                for (long j = 0; j < d; j++) o[j] += ps * vals[s * d + j];
            }
        }
    }
    smallm_linear(att, wo, 0, h, B, hidden, nq, hidden); /* h <- o(att), then the residual */
    for (long i = 0; i < B * hidden; i++) x[i] += h[i];
    rms_norm(x, norm2, h, B, hidden, eps);
    smallm_linear(h, wg, 0, gu, B, inter, hidden, 2 * inter);
    smallm_linear(h, wu, 0, gu + inter, B, inter, hidden, 2 * inter);
    for (long b = 0; b < B; b++) {
        const float *g = gu + b * 2 * inter, *u = g + inter;
        for (long i = 0; i < inter; i++) act[b * inter + i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    smallm_linear(act, wd, 0, h, B, hidden, inter, hidden);
    for (long i = 0; i < B * hidden; i++) x[i] += h[i];
    return 0;
}
