/* The fused LegoNet merge on CPU: out[b, j, p] = relu?(sum_i coef[j, i] * maps[b*o + i, k(j, i), p] + bias[j]).
 *
 * maps is the Lego conv's output, (N*o, m, H, W): fragment i of image b is batch entry b*o + i.
 * index[j*o + i] = i*m + k(j, i) and coef[j*o + i] are the folded layer's own buffers.
 * The maps may also come from a grouped conv, (N, o*m, H, W), channel i*m + k. Two layouts,
 * the output in the input's:
 *   rows:   channels-last, element (image b, fragment i, filter k, pixel p) at b*bs + i*fs + p*ps + k
 *           (batch-folded: bs = o*HW*m, fs = HW*m, ps = m; grouped: bs = HW*o*m, fs = m, ps = o*m);
 *           out at (b*HW + p)*n + j
 *   planes: contiguous, element (b, i, k, p) at ((b*o + i)*m + k)*HW + p in both forms;
 *           out at (b*n + j)*HW + p
 * With AVX2 and FMA, float32 rows go through 8-pixel tiles: the tile's o*m maps are transposed to
 * planes (8 pixels contiguous), gathered, scaled and summed 8 pixels at a time, and transposed back;
 * otherwise (float64, other machines) one pixel at a time. Built by legofx/merge_kernel.py.
 */
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define PLANES(T, SUFFIX)                                                                        \
void lego_merge_planes_##SUFFIX(const T* maps, const int64_t* index, const T* coef, const T* bias,  \
                                T* out, int64_t N, int64_t HW, int64_t n, int64_t o, int64_t m,     \
                                int relu, int threads) {                                           \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                              \
    for (int64_t bj = 0; bj < N * n; ++bj) {                                                       \
        const int64_t b = bj / n, j = bj % n;                                                      \
        T* dst = out + bj * HW;                                                                    \
        const T* src = maps + (b * o * m + index[j * o]) * HW;                                     \
        const T c0 = coef[j * o];                                                                  \
        for (int64_t p = 0; p < HW; ++p) dst[p] = c0 * src[p];                                     \
        for (int64_t i = 1; i < o; ++i) {                                                          \
            const T* s = maps + (b * o * m + index[j * o + i]) * HW;                               \
            const T c = coef[j * o + i];                                                           \
            for (int64_t p = 0; p < HW; ++p) dst[p] += c * s[p];                                   \
        }                                                                                          \
        if (bias) { const T t = bias[j]; for (int64_t p = 0; p < HW; ++p) dst[p] += t; }           \
        if (relu) for (int64_t p = 0; p < HW; ++p) dst[p] = dst[p] > 0 ? dst[p] : 0;               \
    }                                                                                              \
}

#define PIXEL(T, SUFFIX)                                                                           \
/* one pixel of the rows layout: row = maps + b*bs + p*ps */         \
static void pixel_##SUFFIX(const T* row, int64_t fs, const int64_t* index, const T* coef,           \
                           const T* bias, T* dst, int64_t n, int64_t o, int64_t m, int relu) {      \
    for (int64_t j = 0; j < n; ++j) {                                                              \
        T a = 0;                                                                                   \
        for (int64_t i = 0; i < o; ++i) {                                                          \
            const int64_t at = index[j * o + i];                                                   \
            a += coef[j * o + i] * row[(at / m) * fs + at % m];                                    \
        }                                                                                          \
        if (bias) a += bias[j];                                                                    \
        dst[j] = relu && a < 0 ? 0 : a;                                                            \
    }                                                                                              \
}

#define ROWS_SCALAR(T, SUFFIX)                                                                     \
static __attribute__((unused)) void rows_scalar_##SUFFIX(const T* maps, const int64_t* index, const T* coef, const T* bias, \
                                 T* out, int64_t N, int64_t HW, int64_t n, int64_t o, int64_t m,    \
                                 int64_t fs, int64_t ps, int relu, int threads) {                  \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                              \
    for (int64_t bp = 0; bp < N * HW; ++bp) {                                                      \
        const int64_t b = bp / HW, p = bp % HW;                                                    \
        pixel_##SUFFIX(maps + b * o * HW * m + p * ps, fs, index, coef, bias, out + bp * n,        \
                       n, o, m, relu);                                                             \
    }                                                                                              \
}

PLANES(float, f32)
PLANES(double, f64)
PIXEL(float, f32)
PIXEL(double, f64)
ROWS_SCALAR(float, f32)
ROWS_SCALAR(double, f64)

void lego_merge_rows_f64(const double* maps, const int64_t* index, const double* coef,
                         const double* bias, double* out, int64_t N, int64_t HW, int64_t n,
                         int64_t o, int64_t m, int64_t fs, int64_t ps, int relu, int threads) {
    rows_scalar_f64(maps, index, coef, bias, out, N, HW, n, o, m, fs, ps, relu, threads);
}

#if defined(__AVX2__) && defined(__FMA__)
/* dst[c*ds + r] = src[r*ss + c] for an 8x8 block */
static inline void transpose8(const float* src, int64_t ss, float* dst, int64_t ds) {
    __m256 r[8], t[8], s[8];
    for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * ss);
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        s[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        s[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
        s[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        s[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
    }
    for (int k = 0; k < 4; ++k) {
        _mm256_storeu_ps(dst + k * ds, _mm256_permute2f128_ps(s[k], s[k + 4], 0x20));
        _mm256_storeu_ps(dst + (k + 4) * ds, _mm256_permute2f128_ps(s[k], s[k + 4], 0x31));
    }
}

/* dst[c*ds + r] = src[r*ss + c] for a rows x cols block (the edges of a tile) */
static inline void transpose_edge(const float* src, int64_t ss, float* dst, int64_t ds,
                                  int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) dst[c * ds + r] = src[r * ss + c];
}

void lego_merge_rows_f32(const float* maps, const int64_t* index, const float* coef,
                         const float* bias, float* out, int64_t N, int64_t HW, int64_t n,
                         int64_t o, int64_t m, int64_t fs, int64_t ps, int relu, int threads) {
    const int64_t tiles = HW / 8 + 1;  /* the last "tile" is the pixels left over */
    #pragma omp parallel num_threads(threads)
    {
        float* tin = aligned_alloc(32, sizeof(float) * 8 * (o * m + 8));
        float* tout = aligned_alloc(32, sizeof(float) * 8 * (n + 8));
        #pragma omp for schedule(static)
        for (int64_t bt = 0; bt < N * tiles; ++bt) {
            const int64_t b = bt / tiles, p0 = (bt % tiles) * 8;
            const float* image = maps + b * o * HW * m;
            float* dst = out + (b * HW + p0) * n;
            if (p0 + 8 > HW) {
                for (int64_t p = p0; p < HW; ++p)
                    pixel_f32(image + p * ps, fs, index, coef, bias, out + (b * HW + p) * n, n, o, m, relu);
                continue;
            }
            for (int64_t i = 0; i < o; ++i) {  /* tin[(i*m + k)*8 + q]: fragment i, filter k, pixel p0 + q */
                const float* src = image + i * fs + p0 * ps;
                int64_t k = 0;
                for (; k + 8 <= m; k += 8) transpose8(src + k, ps, tin + (i * m + k) * 8, 8);
                if (k < m) transpose_edge(src + k, ps, tin + (i * m + k) * 8, 8, 8, m - k);
            }
            for (int64_t j = 0; j < n; ++j) {
                __m256 v = _mm256_setzero_ps();
                for (int64_t i = 0; i < o; ++i)
                    v = _mm256_fmadd_ps(_mm256_set1_ps(coef[j * o + i]),
                                        _mm256_load_ps(tin + index[j * o + i] * 8), v);
                if (bias) v = _mm256_add_ps(v, _mm256_set1_ps(bias[j]));
                if (relu) v = _mm256_max_ps(_mm256_setzero_ps(), v);  /* keeps NaN, as torch.relu */
                _mm256_store_ps(tout + j * 8, v);
            }
            int64_t j = 0;
            for (; j + 8 <= n; j += 8) transpose8(tout + j * 8, 8, dst + j, n);
            if (j < n) transpose_edge(tout + j * 8, 8, dst + j, n, n - j, 8);
        }
        free(tin);
        free(tout);
    }
}
#else
void lego_merge_rows_f32(const float* maps, const int64_t* index, const float* coef,
                         const float* bias, float* out, int64_t N, int64_t HW, int64_t n,
                         int64_t o, int64_t m, int64_t fs, int64_t ps, int relu, int threads) {
    rows_scalar_f32(maps, index, coef, bias, out, N, HW, n, o, m, fs, ps, relu, threads);
}
#endif

int lego_merge_vectorized(void) {
#if defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}
