// Token log-probabilities and entropy from logits, on the CPU (docs/ops.md#token_logprobs).
//
// One pass over each row of V logits, rows in parallel with OpenMP. Each row is processed in
// chunks that stay in L1: a max over the chunk, then exp/sum over the same (cached) chunk with an
// online rescale of the running sums, so the logits come from memory once and no (N, V)
// temporary (nor an fp32 copy of bf16/fp16 logits) ever exists. On x86 with AVX2+FMA+F16C (checked
// at run time) the inner loops use 8-wide vectors and a polynomial exp; elsewhere a scalar loop.
//
// Logits arrive as a numpy buffer of float32 or of raw 16-bit words (bf16/fp16 viewed as uint16),
// addressed as row(o, i) = data + o*stride_outer + i*stride_inner (element strides, last dim
// contiguous), so views such as logits[:, :-1] are read in place. Both entry points check that
// layout against the buffer's own extent (and the labels against [0, V)) before reading anything.
//
// Temperature: z = x * inv_temp is never formed. Every exponent is (x - max x) * inv_temp, the
// difference taken in the logits' units and scaled after, so log p keeps full float32 *relative*
// precision at any temperature (forming z first loses ulp(max z), e.g. 64 at T = 1e-8).
//
// A row whose softmax is undefined -- a NaN or +inf logit, or every logit -inf -- gives NaN
// log-prob, entropy and gradient (docs/ops.md#token_logprobs); its stats hold log_sum = NaN.
//
// Labels are optional (None: entropy only, or several labels per row gathered by the caller, whose
// one-hot terms the caller then adds in the backward), and so is a row mask: a row whose label is
// ignore_index or whose mask entry is 0 is dead and never read.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "common.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HCRLHF_X86_SIMD 1
#include <immintrin.h>
#else
#define HCRLHF_X86_SIMD 0
#endif

namespace hcrlhf {
namespace {

enum Kind : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// exp underflows to 0 below about -87.3 in float32; clamping there keeps exp(d)·d finite when a
// logit is -inf (a masked vocabulary entry) and changes nothing else at float32 resolution.
constexpr float kMinExpArg = -87.3f;
constexpr int64_t kChunk = 2048;  // elements per cache-resident chunk of a row

// ---------------------------------------------------------------- scalar conversions
inline float bf16_to_float(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
    return static_cast<uint16_t>(bits >> 16);
}

inline float f16_to_float(uint16_t h) {
    const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    float magnitude;
    if (exponent == 0) {
        magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero / subnormal
    } else if (exponent == 31) {
        magnitude = mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
    } else {
        magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
    }
    uint32_t bits;
    std::memcpy(&bits, &magnitude, 4);
    bits |= sign;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t float_to_f16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
    const float a = std::fabs(f);
    if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7e00u);
    if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to infinity
    if (a < 6.103515625e-05f) {  // subnormal half: multiples of 2^-24, round to nearest even
        const float q = std::nearbyint(a * 16777216.0f);
        return static_cast<uint16_t>(sign | static_cast<uint16_t>(q));
    }
    int exponent;
    const float m = std::frexp(a, &exponent);  // a = m * 2^exponent, m in [0.5, 1)
    float q = std::nearbyint(m * 2048.0f);     // 11 significant bits
    if (q >= 2048.0f) { q *= 0.5f; ++exponent; }
    if (exponent + 14 >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
    return static_cast<uint16_t>(sign | ((exponent + 14) << 10) | (static_cast<uint32_t>(q) & 0x3ffu));
}

template <int K>
inline float load1(const void* base, int64_t i) {
    if constexpr (K == kF32) return static_cast<const float*>(base)[i];
    else if constexpr (K == kBF16) return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    else return f16_to_float(static_cast<const uint16_t*>(base)[i]);
}

template <int K>
inline void store1(void* base, int64_t i, float v) {
    if constexpr (K == kF32) static_cast<float*>(base)[i] = v;
    else if constexpr (K == kBF16) static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
    else static_cast<uint16_t*>(base)[i] = float_to_f16(v);
}

template <int K>
inline const void* element(const void* base, int64_t offset) {
    return static_cast<const char*>(base) + offset * (K == kF32 ? 4 : 2);
}
template <int K>
inline void* element(void* base, int64_t offset) {
    return static_cast<char*>(base) + offset * (K == kF32 ? 4 : 2);
}

struct RowResult {
    float max;       // max logit x of the row, unscaled (0 for an undefined row)
    double log_sum;  // log Σ exp((x - max)·inv_temp): logsumexp(z) = max·inv_temp + log_sum; NaN if undefined
    double entropy;  // -Σ p log p (NaN if undefined)
};

// Folds a chunk whose largest logit is `chunk_max` into the running (m, s, t), m the running max
// logit: s = Σ exp(d), t = Σ exp(d)·d with d = (x - m)·inv_temp. Returns false when there is
// nothing to add: the chunk holds only -inf, or the row is undefined (`undefined` is then set).
inline bool rescale(float chunk_max, float inv_temp, float& m, double& s, double& t, bool& undefined) {
    if (std::isnan(chunk_max) || chunk_max == std::numeric_limits<float>::infinity()) {
        undefined = true;
        return false;
    }
    if (chunk_max == -std::numeric_limits<float>::infinity()) return false;
    if (chunk_max > m) {
        if (s > 0) {
            const double shift = (static_cast<double>(m) - chunk_max) * inv_temp;
            const double alpha = std::exp(shift);
            t = alpha * (t + shift * s);
            s *= alpha;
        }
        m = chunk_max;
    }
    return true;
}

inline RowResult finish(float m, double s, double t, bool undefined) {
    if (undefined || m == -std::numeric_limits<float>::infinity()) {  // NaN / +inf seen, or all -inf
        const double nan = std::numeric_limits<double>::quiet_NaN();
        return {0.f, nan, nan};
    }
    const double log_s = std::log(s);
    return {m, log_s, log_s - t / s};
}

// ---------------------------------------------------------------- portable scalar kernels
template <int K, bool ENTROPY>
RowResult forward_row_scalar(const void* row, int64_t V, float inv_temp) {
    float m = -std::numeric_limits<float>::infinity();
    double s = 0.0, t = 0.0;
    bool undefined = false;
    for (int64_t c0 = 0; c0 < V && !undefined; c0 += kChunk) {
        const int64_t n = std::min(kChunk, V - c0);
        float chunk_max = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
            const float x = load1<K>(row, c0 + j);
            chunk_max = (x > chunk_max || std::isnan(x)) ? x : chunk_max;
        }
        if (!rescale(chunk_max, inv_temp, m, s, t, undefined)) continue;
        float cs = 0.f, ct = 0.f;
        for (int64_t j = 0; j < n; ++j) {
            float d = (load1<K>(row, c0 + j) - m) * inv_temp;
            d = d < kMinExpArg ? kMinExpArg : d;
            const float e = std::exp(d);
            cs += e;
            if (ENTROPY) ct += e * d;
        }
        s += cs;
        t += ct;
    }
    return finish(m, s, t, undefined);
}

template <int K>
void backward_row_scalar(const void* row, void* grad_row, int64_t V, float inv_temp, float row_max, float log_sum,
                         float entropy, float grad_logp, float grad_entropy) {
    for (int64_t j = 0; j < V; ++j) {
        float lp = (load1<K>(row, j) - row_max) * inv_temp - log_sum;
        lp = lp < kMinExpArg ? kMinExpArg : lp;
        const float p = std::exp(lp);
        store1<K>(grad_row, j, -p * (grad_logp + grad_entropy * (lp + entropy)) * inv_temp);
    }
}

// ---------------------------------------------------------------- AVX2 + FMA + F16C kernels
#if HCRLHF_X86_SIMD
#define HCRLHF_AVX2 __attribute__((target("avx2,fma,f16c")))

HCRLHF_AVX2 inline __m256 exp256(__m256 x) {
    // Cephes-style expf: x = n·ln2 + r, |r| <= ln2/2, degree-6 polynomial; callers keep x >= -87.3.
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

template <int K>
HCRLHF_AVX2 inline __m256 load8(const void* base, int64_t i) {
    if constexpr (K == kF32) {
        return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    } else {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
        if constexpr (K == kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        else return _mm256_cvtph_ps(h);
    }
}

template <int K>
HCRLHF_AVX2 inline void store8(void* base, int64_t i, __m256 v) {
    if constexpr (K == kF32) {
        _mm256_storeu_ps(static_cast<float*>(base) + i, v);
    } else {
        __m128i packed;
        if constexpr (K == kF16) {
            packed = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        } else {
            // round to nearest even; NaN stays NaN (quiet bit set)
            const __m256i bits = _mm256_castps_si256(v);
            const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
            __m256i rounded = _mm256_srli_epi32(
                _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
            const __m256i nan_bits = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
            const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            rounded = _mm256_blendv_epi8(rounded, nan_bits, is_nan);
            packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), packed);
    }
}

HCRLHF_AVX2 inline float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
}

HCRLHF_AVX2 inline float hmax(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
}

template <int K, bool ENTROPY>
HCRLHF_AVX2 RowResult forward_row_avx2(const void* row, int64_t V, float inv_temp) {
    float m = -std::numeric_limits<float>::infinity();
    double s = 0.0, t = 0.0;
    bool undefined = false;
    const __m256 v_inv = _mm256_set1_ps(inv_temp), v_lo = _mm256_set1_ps(kMinExpArg);
    for (int64_t c0 = 0; c0 < V && !undefined; c0 += kChunk) {
        const int64_t n = std::min(kChunk, V - c0);
        const void* chunk = element<K>(row, c0);
        // pass 1 over the chunk: its max (a NaN anywhere is caught by the NaN-propagating sum below)
        __m256 v_max = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
        __m256 v_nan = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {
            const __m256 x = load8<K>(chunk, j);
            v_max = _mm256_max_ps(v_max, x);
            v_nan = _mm256_or_ps(v_nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        }
        float chunk_max = hmax(v_max);
        bool has_nan = _mm256_movemask_ps(v_nan) != 0;
        for (; j < n; ++j) {
            const float x = load1<K>(chunk, j);
            has_nan |= std::isnan(x);
            chunk_max = std::max(chunk_max, x);
        }
        if (!rescale(has_nan ? std::numeric_limits<float>::quiet_NaN() : chunk_max, inv_temp, m, s, t, undefined))
            continue;
        // pass 2 over the same chunk, now in L1: Σ exp(d) and Σ exp(d)·d, d = (x - m)·inv_temp
        const __m256 v_m = _mm256_set1_ps(m);
        __m256 v_s = _mm256_setzero_ps(), v_t = _mm256_setzero_ps();
        for (j = 0; j + 8 <= n; j += 8) {
            const __m256 d = _mm256_max_ps(v_lo, _mm256_mul_ps(_mm256_sub_ps(load8<K>(chunk, j), v_m), v_inv));
            const __m256 e = exp256(d);
            v_s = _mm256_add_ps(v_s, e);
            if (ENTROPY) v_t = _mm256_fmadd_ps(e, d, v_t);
        }
        float cs = hsum(v_s), ct = ENTROPY ? hsum(v_t) : 0.f;
        for (; j < n; ++j) {
            float d = (load1<K>(chunk, j) - m) * inv_temp;
            d = d < kMinExpArg ? kMinExpArg : d;
            const float e = std::exp(d);
            cs += e;
            if (ENTROPY) ct += e * d;
        }
        s += cs;
        t += ct;
    }
    return finish(m, s, t, undefined);
}

template <int K>
HCRLHF_AVX2 void backward_row_avx2(const void* row, void* grad_row, int64_t V, float inv_temp, float row_max,
                                   float log_sum, float entropy, float grad_logp, float grad_entropy) {
    // grad_z = -p·(g_lp + g_H·(log p + H)); the label's +g_lp is patched in by the caller.
    // log p = (x - max)·inv_temp - log_sum: both terms small near the mode, so no rounding of a
    // large lse, and the difference is taken before scaling (exact at tiny temperatures).
    const __m256 v_inv = _mm256_set1_ps(inv_temp), v_max = _mm256_set1_ps(row_max);
    const __m256 v_logs = _mm256_set1_ps(log_sum), v_lo = _mm256_set1_ps(kMinExpArg);
    const __m256 v_h = _mm256_set1_ps(entropy), v_glp = _mm256_set1_ps(grad_logp);
    const __m256 v_gh = _mm256_set1_ps(grad_entropy), v_neg_inv = _mm256_set1_ps(-inv_temp);
    int64_t j = 0;
    for (; j + 8 <= V; j += 8) {
        const __m256 lp =
            _mm256_max_ps(v_lo, _mm256_fmsub_ps(_mm256_sub_ps(load8<K>(row, j), v_max), v_inv, v_logs));
        const __m256 p = exp256(lp);
        const __m256 coef = _mm256_fmadd_ps(v_gh, _mm256_add_ps(lp, v_h), v_glp);
        store8<K>(grad_row, j, _mm256_mul_ps(_mm256_mul_ps(p, coef), v_neg_inv));
    }
    for (; j < V; ++j) {
        float lp = (load1<K>(row, j) - row_max) * inv_temp - log_sum;
        lp = lp < kMinExpArg ? kMinExpArg : lp;
        const float p = std::exp(lp);
        store1<K>(grad_row, j, -p * (grad_logp + grad_entropy * (lp + entropy)) * inv_temp);
    }
}

bool cpu_has_avx2() {
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
    return ok;
}
#else
bool cpu_has_avx2() { return false; }
#endif

// ---------------------------------------------------------------- drivers
struct Layout {
    int64_t rows, inner, stride_outer, stride_inner, V;
    int64_t row_offset(int64_t r) const { return (r / inner) * stride_outer + (r % inner) * stride_inner; }
};

// A row is live unless its label equals ignore_index or its row-mask entry is 0; without labels
// (nullptr: entropy only, or the caller gathers several labels per row itself) only the row mask
// decides. A dead row is never read: log-prob and entropy 0, stats (0, 0) (its backward writes zeros).
inline bool row_is_live(const int64_t* labels, const uint8_t* row_mask, int64_t r, int64_t ignore_index) {
    return (labels == nullptr || labels[r] != ignore_index) && (row_mask == nullptr || row_mask[r] != 0);
}

template <int K>
void forward_rows(const void* logits, const Layout& L, const int64_t* labels, const uint8_t* row_mask,
                  float inv_temp, int64_t ignore_index, float* logp, float* stats, float* entropy, bool simd) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < L.rows; ++r) {
        if (!row_is_live(labels, row_mask, r, ignore_index)) {
            stats[2 * r] = 0.f;
            stats[2 * r + 1] = 0.f;
            if (logp) logp[r] = 0.f;
            if (entropy) entropy[r] = 0.f;
            continue;
        }
        const void* row = element<K>(logits, L.row_offset(r));
        RowResult res;
#if HCRLHF_X86_SIMD
        if (simd) res = entropy ? forward_row_avx2<K, true>(row, L.V, inv_temp) : forward_row_avx2<K, false>(row, L.V, inv_temp);
        else
#endif
            res = entropy ? forward_row_scalar<K, true>(row, L.V, inv_temp) : forward_row_scalar<K, false>(row, L.V, inv_temp);
        (void)simd;
        stats[2 * r] = res.max;
        stats[2 * r + 1] = static_cast<float>(res.log_sum);
        // label in [0, V): checked by the entry point. -inf label logit -> -inf; undefined row -> NaN.
        if (labels) logp[r] = static_cast<float>((load1<K>(row, labels[r]) - res.max) * inv_temp - res.log_sum);
        if (entropy) entropy[r] = static_cast<float>(res.entropy);
    }
}

template <int K>
void backward_rows(const void* logits, const Layout& L, void* grad, const Layout& G, const int64_t* labels,
                   const uint8_t* row_mask, const float* stats, const float* entropy, const float* grad_logp,
                   const float* grad_entropy, float inv_temp, int64_t ignore_index, bool simd) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < L.rows; ++r) {
        void* grad_row = element<K>(grad, G.row_offset(r));
        if (!row_is_live(labels, row_mask, r, ignore_index)) {  // constant outputs: zero gradient, row not read
            for (int64_t j = 0; j < L.V; ++j) store1<K>(grad_row, j, 0.f);
            continue;
        }
        if (std::isnan(stats[2 * r + 1])) {  // undefined row (NaN / +inf logit, or all -inf): NaN gradient
            for (int64_t j = 0; j < L.V; ++j) store1<K>(grad_row, j, std::numeric_limits<float>::quiet_NaN());
            continue;
        }
        const void* row = element<K>(logits, L.row_offset(r));
        const float g_lp = grad_logp ? grad_logp[r] : 0.f, g_h = grad_entropy ? grad_entropy[r] : 0.f;
        const float h = entropy ? entropy[r] : 0.f;
        // Without labels there is no one-hot term: grad_logp is the row's total upstream gradient
        // and the caller adds it at its label columns (several labels per row).
        const int64_t label = labels ? labels[r] : -1;
        // Read the label's logit before the row is overwritten (the gradient may alias the logits).
        const float x_label = labels ? load1<K>(row, label) : 0.f;  // label in [0, V): checked by the entry point
#if HCRLHF_X86_SIMD
        if (simd) backward_row_avx2<K>(row, grad_row, L.V, inv_temp, stats[2 * r], stats[2 * r + 1], h, g_lp, g_h);
        else
#endif
            backward_row_scalar<K>(row, grad_row, L.V, inv_temp, stats[2 * r], stats[2 * r + 1], h, g_lp, g_h);
        (void)simd;
        if (!labels) continue;
        float lp = (x_label - stats[2 * r]) * inv_temp - stats[2 * r + 1];
        lp = lp < kMinExpArg ? kMinExpArg : lp;
        const float p = std::exp(lp);
        store1<K>(grad_row, label, (g_lp * (1.f - p) - g_h * p * (lp + h)) * inv_temp);
    }
}

const void* buffer_ptr(const py::array& a) { return a.data(); }

template <typename T>
void check_dtype(const py::array& a, const char* name) {
    const char kind = std::is_floating_point<T>::value ? 'f' : 'i';
    require(a.dtype().kind() == kind && a.dtype().itemsize() == static_cast<py::ssize_t>(sizeof(T)),
            std::string(name) + ": wrong dtype (expected " + (kind == 'f' ? "float32" : "int64") + ")");
}

template <typename T>
T* out_ptr(py::array& a, int64_t n, const char* name) {
    check_dtype<T>(a, name);
    require(a.size() == n, std::string(name) + ": wrong size");
    require(a.writeable(), std::string(name) + ": not writeable");
    require(a.flags() & py::array::c_style, std::string(name) + ": must be contiguous");
    return static_cast<T*>(a.mutable_data());
}

template <typename T>
const T* in_ptr(const py::array& a, int64_t n, const char* name) {
    check_dtype<T>(a, name);
    require(a.size() == n, std::string(name) + ": wrong size");
    require(a.flags() & py::array::c_style, std::string(name) + ": must be contiguous");
    return static_cast<const T*>(a.data());
}

[[noreturn]] void out_of_bounds(const std::string& message) { throw std::out_of_range(message); }

// a * b + c for non-negative int64 operands; false when the result would not fit in int64.
bool mul_add(int64_t a, int64_t b, int64_t c, int64_t& out) {
    const int64_t max = std::numeric_limits<int64_t>::max();
    if (a != 0 && b > max / a) return false;
    if (a * b > max - c) return false;
    out = a * b + c;
    return true;
}

// Byte offsets [lo, hi] (relative to data()) covered by the array's own shape and strides; empty
// (lo > hi) for a zero-size array. Everything in between lies inside the array's allocation.
std::pair<int64_t, int64_t> byte_extent(const py::array& a) {
    int64_t lo = 0, hi = 0;
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        if (a.shape(i) == 0) return {0, -1};
        const int64_t span = static_cast<int64_t>(a.shape(i) - 1) * static_cast<int64_t>(a.strides(i));
        (span < 0 ? lo : hi) += span;
    }
    return {lo, hi + static_cast<int64_t>(a.itemsize()) - 1};
}

// Checks a row layout against `buffer` (whose item size is the element unit of the strides): the
// strides are non-negative and every element that rows 0..rows-1 address, V per row, lies inside
// the buffer's own extent. Raises ValueError (malformed) or IndexError (past the buffer).
void check_rows_in_buffer(const char* name, const py::array& buffer, const Layout& L) {
    const std::string what = std::string("token_logprobs: ") + name;
    require(L.V > 0, what + ": vocab must be > 0, got " + std::to_string(L.V));
    require(L.rows >= 0, what + ": rows must be >= 0, got " + std::to_string(L.rows));
    require(L.inner > 0, what + ": inner must be > 0, got " + std::to_string(L.inner));
    require(L.stride_outer >= 0 && L.stride_inner >= 0,
            what + ": strides must be >= 0, got stride_outer=" + std::to_string(L.stride_outer) +
                ", stride_inner=" + std::to_string(L.stride_inner));
    if (L.rows == 0) return;
    // The largest row offset: the last row, or the last row of the previous block of `inner`.
    const int64_t q = (L.rows - 1) / L.inner, m = (L.rows - 1) % L.inner;
    int64_t last = 0, prev = 0, end = 0;
    bool ok = mul_add(q, L.stride_outer, 0, last) && mul_add(m, L.stride_inner, last, last);
    if (ok && q > 0) ok = mul_add(q - 1, L.stride_outer, 0, prev) && mul_add(L.inner - 1, L.stride_inner, prev, prev);
    const int64_t itemsize = static_cast<int64_t>(buffer.itemsize());
    ok = ok && mul_add(std::max(last, prev), 1, L.V, end) && mul_add(end, itemsize, 0, end);  // bytes past row 0
    const std::pair<int64_t, int64_t> extent = byte_extent(buffer);
    if (!ok || end - 1 > extent.second) {
        out_of_bounds(what + ": " + std::to_string(L.rows) + " rows of " + std::to_string(L.V) +
                      " elements with stride_outer=" + std::to_string(L.stride_outer) + ", stride_inner=" +
                      std::to_string(L.stride_inner) + ", inner=" + std::to_string(L.inner) +
                      " reach past the buffer's extent of " +
                      std::to_string(std::max<int64_t>(extent.second + 1, 0) / itemsize) + " elements");
    }
}

void check_layout(const py::array& logits, int kind, const Layout& L) {
    require(kind == kF32 || kind == kBF16 || kind == kF16, "token_logprobs: kind must be 0 (f32), 1 (bf16), 2 (f16)");
    require(logits.itemsize() == (kind == kF32 ? 4 : 2), "token_logprobs: logits item size does not match kind");
    check_rows_in_buffer("logits", logits, L);
}

void check_labels(const int64_t* labels, int64_t rows, int64_t V, int64_t ignore_index) {
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t label = labels[r];
        if (label != ignore_index && (label < 0 || label >= V)) {
            out_of_bounds("token_logprobs: labels[" + std::to_string(r) + "] = " + std::to_string(label) +
                          " is outside [0, " + std::to_string(V) + ") and is not ignore_index=" +
                          std::to_string(ignore_index));
        }
    }
}

void check_inv_temp(double inv_temp) {
    require(std::isfinite(inv_temp) && inv_temp > 0 && std::isfinite(static_cast<float>(inv_temp)),
            "token_logprobs: inv_temp must be finite and > 0 in float32, got " + std::to_string(inv_temp));
}

// Optional int64 labels (rows,) (None: no label is gathered; the log-prob output must be None too)
// and an optional row mask (rows,) of bool / uint8 (0: the row is dead).
const int64_t* optional_labels(const py::object& labels, py::array& keep, int64_t rows, int64_t V,
                               int64_t ignore_index) {
    if (labels.is_none()) return nullptr;
    keep = labels.cast<py::array>();
    const int64_t* lab = in_ptr<int64_t>(keep, rows, "labels");
    check_labels(lab, rows, V, ignore_index);
    return lab;
}

const uint8_t* optional_row_mask(const py::object& row_mask, py::array& keep, int64_t rows) {
    if (row_mask.is_none()) return nullptr;
    keep = row_mask.cast<py::array>();
    require((keep.dtype().kind() == 'b' || keep.dtype().kind() == 'u') && keep.itemsize() == 1,
            "token_logprobs: row_mask: wrong dtype (expected bool or uint8)");
    require(keep.size() == rows, "token_logprobs: row_mask: wrong size");
    require(keep.flags() & py::array::c_style, "token_logprobs: row_mask: must be contiguous");
    return static_cast<const uint8_t*>(keep.data());
}

void token_logprobs_forward(const py::array& logits, int kind, int64_t rows, int64_t inner, int64_t stride_outer,
                            int64_t stride_inner, int64_t V, const py::object& labels, double inv_temp,
                            int64_t ignore_index, py::object logp, py::array& stats, py::object entropy,
                            const py::object& row_mask) {
    const Layout L{rows, inner, stride_outer, stride_inner, V};
    check_layout(logits, kind, L);
    check_inv_temp(inv_temp);
    py::array lab_arr, mask_arr, lp_arr, ent_arr;
    const int64_t* lab = optional_labels(labels, lab_arr, rows, V, ignore_index);
    const uint8_t* mask = optional_row_mask(row_mask, mask_arr, rows);
    require(logp.is_none() == (lab == nullptr), "token_logprobs: logp must be given exactly when labels are");
    float* lp = nullptr;
    if (!logp.is_none()) { lp_arr = logp.cast<py::array>(); lp = out_ptr<float>(lp_arr, rows, "logp"); }
    float* ls = out_ptr<float>(stats, 2 * rows, "stats");
    float* ent = nullptr;
    if (!entropy.is_none()) {
        ent_arr = entropy.cast<py::array>();
        ent = out_ptr<float>(ent_arr, rows, "entropy");
    }
    const void* data = buffer_ptr(logits);
    const bool simd = cpu_has_avx2();
    const float it = static_cast<float>(inv_temp);
    py::gil_scoped_release release;
    if (kind == kF32) forward_rows<kF32>(data, L, lab, mask, it, ignore_index, lp, ls, ent, simd);
    else if (kind == kBF16) forward_rows<kBF16>(data, L, lab, mask, it, ignore_index, lp, ls, ent, simd);
    else forward_rows<kF16>(data, L, lab, mask, it, ignore_index, lp, ls, ent, simd);
}

void token_logprobs_backward(const py::array& logits, int kind, int64_t rows, int64_t inner, int64_t stride_outer,
                             int64_t stride_inner, int64_t V, const py::object& labels, const py::array& stats,
                             py::object entropy, py::object grad_logp, py::object grad_entropy, double inv_temp,
                             int64_t ignore_index, py::array& grad, int64_t grad_stride_outer,
                             int64_t grad_stride_inner, const py::object& row_mask) {
    const Layout L{rows, inner, stride_outer, stride_inner, V};
    const Layout G{rows, inner, grad_stride_outer, grad_stride_inner, V};
    check_layout(logits, kind, L);
    check_inv_temp(inv_temp);
    require(grad.itemsize() == logits.itemsize() && grad.writeable(), "grad: must be writeable, same dtype as logits");
    check_rows_in_buffer("grad", grad, G);
    py::array lab_arr, mask_arr;
    const int64_t* lab = optional_labels(labels, lab_arr, rows, V, ignore_index);
    const uint8_t* mask = optional_row_mask(row_mask, mask_arr, rows);
    const float* ls = in_ptr<float>(stats, 2 * rows, "stats");
    py::array ent_arr, glp_arr, gh_arr;
    const float *ent = nullptr, *glp = nullptr, *gh = nullptr;
    if (!entropy.is_none()) { ent_arr = entropy.cast<py::array>(); ent = in_ptr<float>(ent_arr, rows, "entropy"); }
    if (!grad_logp.is_none()) { glp_arr = grad_logp.cast<py::array>(); glp = in_ptr<float>(glp_arr, rows, "grad_logp"); }
    if (!grad_entropy.is_none()) {
        gh_arr = grad_entropy.cast<py::array>();
        gh = in_ptr<float>(gh_arr, rows, "grad_entropy");
        require(ent != nullptr, "grad_entropy needs entropy");
    }
    const void* data = buffer_ptr(logits);
    void* gdata = grad.mutable_data();
    const bool simd = cpu_has_avx2();
    const float it = static_cast<float>(inv_temp);
    py::gil_scoped_release release;
    if (kind == kF32) backward_rows<kF32>(data, L, gdata, G, lab, mask, ls, ent, glp, gh, it, ignore_index, simd);
    else if (kind == kBF16) backward_rows<kBF16>(data, L, gdata, G, lab, mask, ls, ent, glp, gh, it, ignore_index, simd);
    else backward_rows<kF16>(data, L, gdata, G, lab, mask, ls, ent, glp, gh, it, ignore_index, simd);
}

}  // namespace

void register_logprobs(py::module_& m) {
    m.def("token_logprobs_forward", &token_logprobs_forward,
          "Per-row log-prob of the label (labels may be None), stats (max x, log Σ exp((x - max)·inv_temp)) and "
          "(optionally) entropy of softmax(x·inv_temp); rows with an ignored label or a 0 row_mask entry are not read.",
          py::kw_only(), py::arg("logits"), py::arg("kind"), py::arg("rows"), py::arg("inner"),
          py::arg("stride_outer"), py::arg("stride_inner"), py::arg("vocab"), py::arg("labels"), py::arg("inv_temp"),
          py::arg("ignore_index"), py::arg("logp"), py::arg("stats"), py::arg("entropy"),
          py::arg("row_mask") = py::none());
    m.def("token_logprobs_backward", &token_logprobs_backward,
          "Gradient w.r.t. the logits of Σ g_lp·logp + g_H·entropy, recomputing softmax from stats (may alias logits).",
          py::kw_only(), py::arg("logits"), py::arg("kind"), py::arg("rows"), py::arg("inner"),
          py::arg("stride_outer"), py::arg("stride_inner"), py::arg("vocab"), py::arg("labels"), py::arg("stats"),
          py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("inv_temp"),
          py::arg("ignore_index"), py::arg("grad"), py::arg("grad_stride_outer"), py::arg("grad_stride_inner"),
          py::arg("row_mask") = py::none());
    m.attr("logprobs_simd") = cpu_has_avx2();
}

}  // namespace hcrlhf
