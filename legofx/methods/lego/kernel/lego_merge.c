/* The fused LegoNet merge on CPU: out[b, j, p] = relu?(sum_i coef[j, i] * map(b, i, k(j, i), p) + bias[j]).
 *
 * index[j*o + i] = i*m + k(j, i) and coef[j*o + i] are the folded layer's own buffers; map(b, i, k, p)
 * is Lego filter k's response to fragment i of image b at pixel p, channels-last (the Lego conv with
 * groups=o gives (N, o*m, H, W), fragment i's maps are channels i*m..; strides in elements):
 *   map(b, i, k, p) at b*bs + i*fs + p*ps + k,   out(b, j, p) at b*obs + p*ops + j
 *
 * out may be maps itself (the merge in place, when o*m == n and both have the same strides): each
 * pixel's maps are read whole before its results are written.
 * Every function returns 0, or -1 (and writes nothing) when an entry index[j*o + i] is not one of
 * fragment i's maps, i.e. outside [i*m, (i+1)*m).
 * float32 gathers 16 (AVX-512) or 8 (AVX2) channels per instruction where the compiler
 * targets them, otherwise one channel at a time. Built by legofx/merge_kernel.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

/* The per-fragment tables the kernels read: k(j, i) at kt[i*np + j], coef[j, i] at ct[i*np + j],
 * bias at bt[j]; np = n rounded up to whole vectors, padded with index 0 and coefficient 0. */
#define TABLES(T)                                                                                  \
    const int64_t np = (n + 15) / 16 * 16;                                                         \
    for (int64_t e = 0; e < n * o; ++e) /* entry j*o + i picks one of fragment i's maps */         \
        if (index[e] < (e % o) * m || index[e] >= (e % o + 1) * m) return -1;                      \
    int32_t* kt = aligned_alloc(64, sizeof(int32_t) * o * np);                                     \
    T* ct = aligned_alloc(64, sizeof(T) * o * np);                                                 \
    T* bt = aligned_alloc(64, sizeof(T) * np);                                                     \
    for (int64_t i = 0; i < o; ++i)                                                                \
        for (int64_t j = 0; j < np; ++j) {                                                         \
            kt[i * np + j] = j < n ? (int32_t)(index[j * o + i] % m) : 0;                           \
            ct[i * np + j] = j < n ? coef[j * o + i] : (T)0;                                       \
        }                                                                                          \
    for (int64_t j = 0; j < np; ++j) bt[j] = bias && j < n ? bias[j] : (T)0;

#define FREE_TABLES free(kt); free(ct); free(bt);

/* one pixel, plain C: row + i*fs = fragment i's m maps at this pixel; with `scratch` (in place)
 * the results go there first */
#define ROW_PIXEL(T, SUFFIX)                                                                       \
static __attribute__((unused)) void row_pixel_##SUFFIX(const T* row, int64_t fs, int64_t m,         \
        const int32_t* kt, const T* ct, const T* bt, T* dst, int64_t n, int64_t np, int64_t o,      \
        int relu, T* scratch) {                                                                    \
    (void)m;                                                                                       \
    T* w = scratch ? scratch : dst;                                                                \
    for (int64_t j = 0; j < n; ++j) {                                                              \
        T a = bt[j];                                                                               \
        for (int64_t i = 0; i < o; ++i) a += ct[i * np + j] * row[i * fs + kt[i * np + j]];       \
        w[j] = relu && a < 0 ? 0 : a;                                                              \
    }                                                                                              \
    if (scratch) memcpy(dst, scratch, sizeof(T) * n);                                              \
}

ROW_PIXEL(float, f32)
ROW_PIXEL(double, f64)

#if defined(__AVX512F__)
#define VECTOR_ROWS 16
#define HELD 8 /* fragments whose maps a pixel holds in registers (m <= 32; half as many for m <= 64) */
static inline __mmask16 first(int64_t lanes) {  /* the first `lanes` of 16, clipped to [0, 16] */
    return lanes >= 16 ? (__mmask16)0xFFFF : lanes <= 0 ? (__mmask16)0 : (__mmask16)((1u << lanes) - 1);
}

/* dst[j] for all n channels of one pixel, 16 channels at a time. With up to 64 maps per fragment
 * (and few fragments) the pixel's maps are loaded into registers first (masked loads never read
 * past a row) and permuted, so dst may be the row itself; otherwise they are gathered from memory
 * and the results go to `scratch` first when writing in place. Inlined with a constant o (see
 * MERGE) the held maps stay in registers. */
static inline __attribute__((always_inline)) void row_pixel_simd(
        const float* row, int64_t fs, int64_t m, const int32_t* kt, const float* ct, const float* bt,
        float* dst, int64_t n, int64_t np, int64_t o, int relu, float* scratch) {
    __m512 q0[HELD], q1[HELD], q2[HELD / 2], q3[HELD / 2];
    const int held = (m <= 32 && o <= HELD) || (m <= 64 && o <= HELD / 2);
    if (held)
        for (int64_t i = 0; i < o; ++i) {
            q0[i] = _mm512_maskz_loadu_ps(first(m), row + i * fs);
            q1[i] = _mm512_maskz_loadu_ps(first(m - 16), row + i * fs + 16);
            if (m > 32) {
                q2[i] = _mm512_maskz_loadu_ps(first(m - 32), row + i * fs + 32);
                q3[i] = _mm512_maskz_loadu_ps(first(m - 48), row + i * fs + 48);
            }
        }
    float* out = held || !scratch ? dst : scratch;
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 lanes = first(n - j);
        __m512 acc = _mm512_load_ps(bt + j);
        for (int64_t i = 0; i < o; ++i) {
            const __m512i k = _mm512_load_si512((const void*)(kt + i * np + j));
            __m512 v;
            if (!held) {
                v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, k, row + i * fs, 4);
            } else {
                v = _mm512_permutex2var_ps(q0[i], k, q1[i]);
                if (m > 32)
                    v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(k, _mm512_set1_epi32(32)), v,
                                             _mm512_permutex2var_ps(q2[i], k, q3[i]));
            }
            acc = _mm512_fmadd_ps(_mm512_load_ps(ct + i * np + j), v, acc);
        }
        if (relu) acc = _mm512_max_ps(_mm512_setzero_ps(), acc);  /* keeps NaN, as torch.relu */
        _mm512_mask_storeu_ps(out + j, lanes, acc);
    }
    if (out != dst) memcpy(dst, out, sizeof(float) * n);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define VECTOR_ROWS 8
static void row_pixel_simd(const float* row, int64_t fs, int64_t m, const int32_t* kt, const float* ct,
                           const float* bt, float* dst, int64_t n, int64_t np, int64_t o, int relu,
                           float* scratch) {
    (void)m;
    float* w = scratch ? scratch : dst;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 acc = _mm256_load_ps(bt + j);
        for (int64_t i = 0; i < o; ++i) {
            const __m256i k = _mm256_load_si256((const __m256i*)(kt + i * np + j));
            acc = _mm256_fmadd_ps(_mm256_load_ps(ct + i * np + j), _mm256_i32gather_ps(row + i * fs, k, 4), acc);
        }
        if (relu) acc = _mm256_max_ps(_mm256_setzero_ps(), acc);
        _mm256_storeu_ps(w + j, acc);
    }
    for (; j < n; ++j) {
        float a = bt[j];
        for (int64_t i = 0; i < o; ++i) a += ct[i * np + j] * row[i * fs + kt[i * np + j]];
        w[j] = relu && a < 0 ? 0 : a;
    }
    if (scratch) memcpy(dst, scratch, sizeof(float) * n);
}
#else
#define VECTOR_ROWS 0
#define row_pixel_simd row_pixel_f32
#endif

/* the pixels [start, end) of the N*HW: one thread's run (no division per pixel) */
#define PIXELS(T, PIXEL, O)                                                                        \
    for (int64_t b = start / HW, p = start % HW, bp = start; bp < end; ++bp) {                     \
        PIXEL(maps + b * bs + p * ps, fs, m, kt, ct, bt, out + b * obs + p * ops, n, np, O, relu, \
              scratch);                                                                            \
        if (++p == HW) { p = 0; ++b; }                                                             \
    }

#define MERGE(T, SUFFIX, PIXEL)                                                                     \
int lego_merge_##SUFFIX(const T* maps, const int64_t* index, const T* coef, const T* bias,          \
                        T* out, int64_t N, int64_t HW, int64_t n, int64_t o, int64_t m,             \
                        int64_t bs, int64_t fs, int64_t ps, int64_t obs, int64_t ops,               \
                        int relu, int threads) {                                                   \
    TABLES(T)                                                                                      \
    const int inplace = (const T*)out == maps;                                                     \
    _Pragma("omp parallel num_threads(threads)")                                                   \
    {                                                                                              \
        T* scratch = inplace ? aligned_alloc(64, sizeof(T) * np) : NULL;                           \
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();                    \
        const int64_t start = N * HW * me / team, end = N * HW * (me + 1) / team;                  \
        switch (o) { /* the usual fragment counts as constants */                                  \
            case 1: PIXELS(T, PIXEL, 1) break;                                                     \
            case 2: PIXELS(T, PIXEL, 2) break;                                                     \
            case 4: PIXELS(T, PIXEL, 4) break;                                                     \
            default: PIXELS(T, PIXEL, o)                                                           \
        }                                                                                          \
        free(scratch);                                                                             \
    }                                                                                              \
    FREE_TABLES                                                                                    \
    return 0;                                                                                      \
}

MERGE(float, f32, row_pixel_simd)
MERGE(double, f64, row_pixel_f64)

/* channels per gather instruction of the float32 kernel: 16, 8, or 0 (plain C) */
int lego_merge_vectorized(void) { return VECTOR_ROWS; }
