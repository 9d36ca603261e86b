// CPU kernels for the advantage ops (docs/ops.md): gae, safe_advantages, rloo_advantages, group_advantages.
//
// The math mirrors hcrlhf/reference/{gae,safe_advantages,rloo_advantages}.py operation by
// operation (same evaluation order, same compute dtype), so float32 results agree with the
// reference to rounding and float64 results to ~1e-12. Each row is one right-to-left sweep:
// the KL estimate, the reward/cost shaping, both GAE recursions and their combination are done
// per token in registers, so nothing of size B×T is allocated beyond the caller's outputs.
//
// Inputs are numpy views with arbitrary element strides (int64 offsets); outputs are contiguous
// arrays of the compute dtype allocated by the caller. float32 inputs compute in float, float64
// in double. Rows (or RLOO groups) are independent and are split over OpenMP threads with the
// GIL released.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __SSE2__
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

#include "common.h"

namespace hcrlhf {
namespace {

using index_t = int64_t;

constexpr double kWhitenEps = 1e-8;  // reference.gae.WHITEN_EPS
// Below this many tokens a parallel region costs more than it saves.
constexpr index_t kParallelMinWork = index_t(1) << 15;

// Rows are handed out dynamically in chunks of about 8K tokens: cheap to schedule, and a thread
// that is descheduled (a shared machine) or slowed by long rows does not hold the others back.
inline index_t rows_per_chunk(index_t length) {
    return std::clamp<index_t>((index_t(1) << 13) / std::max<index_t>(length, 1), 1, 64);
}

enum class KlEstimator { k1, k2, k3 };

// ---------------------------------------------------------------------------------------------
// Argument checking (with the GIL held). Every message names the op and the argument; it is
// built only on failure, so a valid call costs a few microseconds.

template <typename Message>
inline void check(bool ok, Message&& message) {
    if (!ok) throw std::invalid_argument(message());
}

std::string prefix(const char* op, const char* name) { return std::string(op) + ": " + name; }

std::string number_string(double value) { return py::repr(py::float_(value)).cast<std::string>(); }

std::string shape_string(const std::vector<index_t>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) {
        s += std::to_string(shape[i]);
        if (shape.size() == 1 || i + 1 < shape.size()) s += shape.size() == 1 ? "," : ", ";
    }
    return s + ")";
}

std::vector<index_t> shape_of(const py::array& a) {
    std::vector<index_t> shape;
    for (py::ssize_t i = 0; i < a.ndim(); ++i) shape.push_back(static_cast<index_t>(a.shape(i)));
    return shape;
}

std::string dtype_string(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

template <typename T>
const char* dtype_name() {
    return std::is_same<T, float>::value ? "float32" : "float64";
}

py::array get_array(const char* op, const char* name, const py::object& obj) {
    check(py::isinstance<py::array>(obj), [&] {
        return prefix(op, name) + " must be a numpy array, got " +
               py::str(py::type::of(obj).attr("__name__")).cast<std::string>();
    });
    return py::reinterpret_borrow<py::array>(obj);
}

void check_shape(const char* op, const char* name, const py::array& a, std::initializer_list<index_t> shape) {
    bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
    py::ssize_t axis = 0;
    for (index_t extent : shape) ok = ok && static_cast<index_t>(a.shape(axis++)) == extent;
    check(ok, [&] {
        return prefix(op, name) + " must have shape " + shape_string(shape) + ", got " + shape_string(shape_of(a));
    });
}

template <typename T>
void check_dtype(const char* op, const char* name, const py::array& a, const char* why) {
    check(py::isinstance<py::array_t<T>>(a), [&] {
        return prefix(op, name) + " must have dtype " + dtype_name<T>() + why + ", got " + dtype_string(a);
    });
}

// Strides must be whole elements and the data aligned, or element indexing would be wrong.
void check_layout(const char* op, const char* name, const py::array& a) {
    if (a.size() == 0) return;
    const auto itemsize = static_cast<py::ssize_t>(a.itemsize());
    bool ok = reinterpret_cast<std::uintptr_t>(a.data()) % static_cast<std::uintptr_t>(itemsize) == 0;
    for (py::ssize_t i = 0; i < a.ndim(); ++i) ok = ok && a.strides(i) % itemsize == 0;
    check(ok, [&] { return prefix(op, name) + " must be aligned, with strides that are multiples of its item size"; });
}

// The compute dtype of a call is the dtype of its first float input: float32 or float64.
bool is_float64(const char* op, const char* name, const py::array& a) {
    if (py::isinstance<py::array_t<float>>(a)) return false;
    if (py::isinstance<py::array_t<double>>(a)) return true;
    throw std::invalid_argument(prefix(op, name) + " must be float32 or float64, got " + dtype_string(a));
}

// The (B, T) shape of a call, from its first per-token input.
std::pair<index_t, index_t> batch_and_length(const char* op, const char* name, const py::array& a) {
    check(a.ndim() == 2, [&] { return prefix(op, name) + " must be 2-D (B, T), got shape " + shape_string(shape_of(a)); });
    return {static_cast<index_t>(a.shape(0)), static_cast<index_t>(a.shape(1))};
}

// Read-only strided 2-D view, in elements.
template <typename T>
struct Matrix {
    const T* data = nullptr;
    index_t row_stride = 0, col_stride = 0;
    const T* row(index_t b) const { return data + b * row_stride; }
};

// Read-only strided 1-D view, in elements.
template <typename T>
struct Vector {
    const T* data = nullptr;
    index_t stride = 0;
    T operator[](index_t i) const { return data[i * stride]; }
};

template <typename T>
Matrix<T> input_matrix(const char* op, const char* name, const py::object& obj, index_t rows, index_t cols) {
    py::array a = get_array(op, name, obj);
    check_shape(op, name, a, {rows, cols});
    check_dtype<T>(op, name, a, " like the other float inputs");
    check_layout(op, name, a);
    return {static_cast<const T*>(a.data()), elem_stride(a, 0), elem_stride(a, 1)};
}

template <typename T>
Vector<T> input_vector(const char* op, const char* name, const py::object& obj, index_t rows) {
    py::array a = get_array(op, name, obj);
    check_shape(op, name, a, {rows});
    check_dtype<T>(op, name, a, " like the other float inputs");
    check_layout(op, name, a);
    return {static_cast<const T*>(a.data()), elem_stride(a, 0)};
}

Matrix<uint8_t> input_mask(const char* op, const py::object& obj, index_t rows, index_t cols) {
    py::array a = get_array(op, "mask", obj);
    check_shape(op, "mask", a, {rows, cols});
    check(py::isinstance<py::array_t<bool>>(a),
          [&] { return prefix(op, "mask") + " must be a bool array, got " + dtype_string(a); });
    return {static_cast<const uint8_t*>(a.data()), elem_stride(a, 0), elem_stride(a, 1)};
}

template <typename T>
T* output_array(const char* op, const char* name, const py::object& obj, std::initializer_list<index_t> shape) {
    py::array a = get_array(op, name, obj);
    check_shape(op, name, a, shape);
    check_dtype<T>(op, name, a, " (the compute dtype)");
    check(a.writeable(), [&] { return prefix(op, name) + " must be writable"; });
    check((a.flags() & py::array::c_style) != 0, [&] { return prefix(op, name) + " must be C-contiguous"; });
    check_layout(op, name, a);
    return static_cast<T*>(a.mutable_data());
}

KlEstimator parse_estimator(const char* op, const std::string& name) {
    if (name == "k1") return KlEstimator::k1;
    if (name == "k2") return KlEstimator::k2;
    if (name == "k3") return KlEstimator::k3;
    throw std::invalid_argument(prefix(op, "kl_estimator") + " must be one of ('k1', 'k2', 'k3'), got '" + name + "'");
}

void check_finite(const char* op, const char* name, double value) {
    check(std::isfinite(value), [&] { return prefix(op, name) + " must be finite, got " + number_string(value); });
}

void check_score_clip(const char* op, double score_clip) {
    check(score_clip > 0, [&] {
        return prefix(op, "score_clip") + " must be > 0 (math.inf for no clipping), got " + number_string(score_clip);
    });
}

// ---------------------------------------------------------------------------------------------
// Shared math (mirrors the reference expression by expression).

// torch.clamp: NaN passes through; an infinite bound is a no-op. Two single selects compile to
// branch-free maxss/minss whose NaN rule (return the second operand) keeps x.
template <typename T>
inline T clamp(T x, T lo, T hi) {
    x = lo > x ? lo : x;
    return hi < x ? hi : x;
}

// k3 as verl's "low_var_kl": the log-ratio clamped to ±20 first, the estimate to ±10 after
// (reference.kl_penalty.K3_LOG_RATIO_CLIP / K3_CLIP).
constexpr double kK3LogRatioClip = 20.0;
constexpr double kK3Clip = 10.0;

// k1 = d, k2 = d²/2, k3 = clamp(e^{-c} - 1 + c, ±10) with c = clamp(d, ±20)
// (reference.kl_penalty.kl_penalty).
template <KlEstimator E, typename T>
inline T kl_estimate(T logprob, T ref_logprob) {
    const T d = logprob - ref_logprob;
    if constexpr (E == KlEstimator::k1) {
        return d;
    } else if constexpr (E == KlEstimator::k2) {
        return T(0.5) * d * d;
    } else {
        const T c = clamp(d, T(-kK3LogRatioClip), T(kK3LogRatioClip));
        return clamp(std::exp(-c) - T(1) + c, T(-kK3Clip), T(kK3Clip));
    }
}

// reference.safe_advantages.multiplier_tensor: a negative or non-finite λ becomes NaN.
inline double sanitize_multiplier(double multiplier) {
    return std::isfinite(multiplier) && multiplier >= 0 ? multiplier : std::numeric_limits<double>::quiet_NaN();
}

// Calls f(std::integral_constant<KlEstimator, E>{}) so the estimator is a compile-time constant.
template <typename F>
void with_estimator(KlEstimator e, F&& f) {
    switch (e) {
        case KlEstimator::k1: f(std::integral_constant<KlEstimator, KlEstimator::k1>{}); break;
        case KlEstimator::k2: f(std::integral_constant<KlEstimator, KlEstimator::k2>{}); break;
        case KlEstimator::k3: f(std::integral_constant<KlEstimator, KlEstimator::k3>{}); break;
    }
}

// ---------------------------------------------------------------------------------------------
// Whitening over all valid tokens of the batch (reference.gae.masked_whiten), shared by gae and
// safe_advantages: each row's sweep returns its moments, the moments are combined (Chan et al.),
// then one pass rescales the output in place.

enum class WhitenVariance { unbiased, population, none };

struct WhitenOptions {
    bool enabled = false;
    WhitenVariance variance = WhitenVariance::unbiased;
    bool shift_mean = true;
};

WhitenOptions parse_whiten(const char* op, bool whiten, const std::string& variance, bool shift_mean) {
    WhitenOptions w;
    w.enabled = whiten;
    w.shift_mean = shift_mean;
    if (variance == "unbiased") {
        w.variance = WhitenVariance::unbiased;
    } else if (variance == "population") {
        w.variance = WhitenVariance::population;
    } else if (variance == "none") {
        w.variance = WhitenVariance::none;
    } else {
        throw std::invalid_argument(prefix(op, "whiten_variance") +
                                    " must be one of ('unbiased', 'population', 'none'), got '" + variance + "'");
    }
    return w;
}

// v where the mask byte m is nonzero, +0 where it is 0: a bitwise AND instead of a select, since GCC does not vectorise a select on a uint8 condition over float/double data. Unlike
// v·m it gives 0 for a NaN or infinite v too, as the reference's torch.where does.
template <typename T>
inline T keep_if(T v, uint8_t m) {
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    Bits bits;
    std::memcpy(&bits, &v, sizeof(T));
    bits &= Bits(0) - static_cast<Bits>(m != 0);
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

// Per-row statistics of an output over the valid tokens.
struct RowMoments {
    double count = 0, mean = 0, m2 = 0;  // m2 = Σ (x - mean)²
};

// Moments of x[0..end] over the valid tokens, given their sum and count from the sweep that wrote
// them: a second pass over the (cache-hot) row gives M2 about the row mean, so the batch variance
// is combined stably without a global sum of squares.
template <typename T>
RowMoments row_moments(const T* x, const uint8_t* mask, index_t ms, index_t end, double sum, index_t count) {
    RowMoments moments;
    if (count == 0) return moments;
    moments.count = static_cast<double>(count);
    moments.mean = sum / moments.count;
    const double mean = moments.mean;
    double m2 = 0;
    if (ms == 1) {  // the usual contiguous mask: a unit-stride loop the compiler vectorises
#pragma omp simd reduction(+ : m2)
        for (index_t t = 0; t <= end; ++t) {
            const double centred = keep_if(static_cast<double>(x[t]) - mean, mask[t]);
            m2 += centred * centred;
        }
    } else {
        for (index_t t = 0; t <= end; ++t) {
            const double centred = keep_if(static_cast<double>(x[t]) - mean, mask[t * ms]);
            m2 += centred * centred;
        }
    }
    moments.m2 = m2;
    return moments;
}

// The batch's moments from the rows' (Chan et al.'s pairwise combination, row by row).
inline RowMoments combine_moments(const std::vector<RowMoments>& rows) {
    RowMoments total;
    for (const RowMoments& row : rows) {
        if (row.count == 0) continue;
        const double count = total.count + row.count;
        const double delta = row.mean - total.mean;
        total.mean += delta * (row.count / count);
        total.m2 += row.m2 + delta * delta * (total.count * row.count / count);
        total.count = count;
    }
    return total;
}

// reference.gae.masked_whiten's scale: rsqrt(var + eps) (unbiased, verl), rsqrt(max(var, eps)) (population,
// OpenRLHF) or 1 (none).
inline double whiten_scale(const RowMoments& total, WhitenVariance variance, double eps) {
    if (variance == WhitenVariance::unbiased) {
        return 1.0 / std::sqrt((total.count > 1 ? total.m2 / (total.count - 1) : 0.0) + eps);
    }
    if (variance == WhitenVariance::population) {
        return 1.0 / std::sqrt(std::max(total.count > 0 ? total.m2 / total.count : 0.0, eps));
    }
    return 1.0;
}

// x = (x - mean)·scale (+ mean without shift_mean) on valid tokens, 0 on masked ones (whiten_scale).
template <typename T>
void whiten_rows(T* x, const Matrix<uint8_t>& mask, index_t batch, index_t n, const std::vector<RowMoments>& rows,
                 const WhitenOptions& w) {
    const RowMoments total = combine_moments(rows);
    const double scale = whiten_scale(total, w.variance, kWhitenEps);
    const T mean = static_cast<T>(total.mean);
    const T scale_t = static_cast<T>(scale);
    const T shift = w.shift_mean ? T(0) : mean;
    const index_t chunk = rows_per_chunk(n);
#pragma omp parallel for schedule(dynamic, chunk) if (batch * n >= kParallelMinWork)
    for (index_t b = 0; b < batch; ++b) {
        T* __restrict out = x + b * n;
        const uint8_t* m = mask.row(b);
        const index_t ms = mask.col_stride;
        if (ms == 1) {  // the usual contiguous mask: a unit-stride loop the compiler vectorises
            for (index_t t = 0; t < n; ++t) out[t] = keep_if((out[t] - mean) * scale_t + shift, m[t]);
        } else {
            for (index_t t = 0; t < n; ++t) out[t] = keep_if((out[t] - mean) * scale_t + shift, m[t * ms]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// gae

template <typename T>
struct GaeArgs {
    Matrix<T> rewards, values;
    Matrix<uint8_t> mask;
    T* advantages;
    T* returns;
    index_t batch, length;
    double gamma, gae_lambda;
    WhitenOptions whiten;
};

// The carried state of one row's right-to-left sweep.
template <typename T>
struct GaeRowState {
    T next_value = 0, running = 0;
    double sum = 0;  // of the valid advantages, for whitening
    index_t count = 0, end = -1;
};

// Row b's sweep over the tokens stop - 1 .. 0, continuing from `state` (the tokens from stop on
// are done). Returns the row's moments when whitening.
template <typename T>
RowMoments gae_row_from(const GaeArgs<T>& a, index_t b, index_t stop, T gamma, T gamma_gae_lambda,
                        GaeRowState<T> state) {
    const index_t n = a.length;
    const T* rewards = a.rewards.row(b);
    const T* values = a.values.row(b);
    const uint8_t* mask = a.mask.row(b);
    const index_t rs = a.rewards.col_stride, vs = a.values.col_stride, ms = a.mask.col_stride;
    T* __restrict advantages = a.advantages + b * n;
    T* __restrict returns = a.returns + b * n;
    const bool whiten = a.whiten.enabled;
    T next_value = state.next_value, running = state.running;
    double sum = state.sum;
    index_t count = state.count, end = state.end;
    for (index_t t = stop - 1; t >= 0; --t) {
        if (!mask[t * ms]) {  // masked: transparent, output 0
            advantages[t] = T(0);
            returns[t] = T(0);
            continue;
        }
        const T value = values[t * vs];
        const T delta = rewards[t * rs] + gamma * next_value - value;
        running = delta + gamma_gae_lambda * running;
        advantages[t] = running;
        returns[t] = running + value;
        next_value = value;
        if (whiten) {
            sum += static_cast<double>(running);
            if (end < 0) end = t;
            ++count;
        }
    }
    return whiten ? row_moments(advantages, mask, ms, end, sum, count) : RowMoments{};
}

// Rows swept together by gae_rows4: each row's scan is one serial multiply-add chain per token
// (latency-bound, a few cycles a step), so four rows stepped in the four lanes of an SSE vector
// hide that latency. Per row the operations and their order are those of gae_row, so the results
// are bit-identical; the mask is applied by selects instead of a branch.
#ifdef __SSE2__
constexpr bool kGaeVectorised = true;

inline void transpose4(__m128& a, __m128& b, __m128& c, __m128& d) { _MM_TRANSPOSE4_PS(a, b, c, d); }

// Rows b0 .. b0 + 3 (float32, unit column strides), 16 tokens at a time: each row's 64-byte
// segment of every array is read or written whole and transposed in registers (token-major,
// one lane per row). Stepping the rows straight from memory instead (one token of each row per
// step) was 3-5x slower: rows a multiple of 4 KiB apart share L1 sets, and small lane arrays
// went through store forwarding. Tokens below n % 16 are finished by gae_row_from.
template <bool Whiten>
void gae_rows4(const GaeArgs<float>& a, index_t b0, float gamma_f, float gamma_gae_lambda_f, RowMoments* moments) {
    const index_t n = a.length;
    const float* r[4];
    const float* v[4];
    const uint8_t* mk[4];
    float* adv[4];
    float* ret[4];
    for (int i = 0; i < 4; ++i) {
        r[i] = a.rewards.row(b0 + i);
        v[i] = a.values.row(b0 + i);
        mk[i] = a.mask.row(b0 + i);
        adv[i] = a.advantages + (b0 + i) * n;
        ret[i] = a.returns + (b0 + i) * n;
    }
    const __m128 gamma = _mm_set1_ps(gamma_f), gamma_gae_lambda = _mm_set1_ps(gamma_gae_lambda_f);
    const __m128i low_byte = _mm_set1_epi32(0xFF), zero = _mm_setzero_si128();
    __m128 next_value = _mm_setzero_ps(), running = _mm_setzero_ps();
    __m128d sum_lo = _mm_setzero_pd(), sum_hi = _mm_setzero_pd();  // lanes 0-1 and 2-3, for whitening
    __m128i count = zero, end = _mm_set1_epi32(-1);
    const index_t head = n % 16;
    for (index_t t0 = n - 16; t0 >= head; t0 -= 16) {
        __m128 rt[16], vt[16], at[16], et[16];
        __m128i mt[4];
        for (int k = 0; k < 4; ++k) {
            __m128 x0 = _mm_loadu_ps(r[0] + t0 + 4 * k), x1 = _mm_loadu_ps(r[1] + t0 + 4 * k);
            __m128 x2 = _mm_loadu_ps(r[2] + t0 + 4 * k), x3 = _mm_loadu_ps(r[3] + t0 + 4 * k);
            transpose4(x0, x1, x2, x3);
            rt[4 * k] = x0, rt[4 * k + 1] = x1, rt[4 * k + 2] = x2, rt[4 * k + 3] = x3;
            __m128 y0 = _mm_loadu_ps(v[0] + t0 + 4 * k), y1 = _mm_loadu_ps(v[1] + t0 + 4 * k);
            __m128 y2 = _mm_loadu_ps(v[2] + t0 + 4 * k), y3 = _mm_loadu_ps(v[3] + t0 + 4 * k);
            transpose4(y0, y1, y2, y3);
            vt[4 * k] = y0, vt[4 * k + 1] = y1, vt[4 * k + 2] = y2, vt[4 * k + 3] = y3;
        }
        {  // mask bytes: row i's 16 bytes as four dwords; transposed, mt[k] holds tokens 4k..4k+3 of every row
            __m128 m0 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mk[0] + t0)));
            __m128 m1 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mk[1] + t0)));
            __m128 m2 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mk[2] + t0)));
            __m128 m3 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mk[3] + t0)));
            transpose4(m0, m1, m2, m3);
            mt[0] = _mm_castps_si128(m0), mt[1] = _mm_castps_si128(m1);
            mt[2] = _mm_castps_si128(m2), mt[3] = _mm_castps_si128(m3);
        }
        for (int s = 15; s >= 0; --s) {
            const __m128i byte = _mm_and_si128(_mm_srli_epi32(mt[s / 4], 8 * (s % 4)), low_byte);
            const __m128i valid = _mm_xor_si128(_mm_cmpeq_epi32(byte, zero), _mm_set1_epi32(-1));
            const __m128 m = _mm_castsi128_ps(valid);
            const __m128 value = vt[s];
            const __m128 delta = _mm_sub_ps(_mm_add_ps(rt[s], _mm_mul_ps(gamma, next_value)), value);
            const __m128 stepped = _mm_add_ps(delta, _mm_mul_ps(gamma_gae_lambda, running));
            running = _mm_or_ps(_mm_and_ps(m, stepped), _mm_andnot_ps(m, running));
            next_value = _mm_or_ps(_mm_and_ps(m, value), _mm_andnot_ps(m, next_value));
            at[s] = _mm_and_ps(m, running);
            et[s] = _mm_and_ps(m, _mm_add_ps(running, value));
            if (Whiten) {  // adding the +0 of a masked token leaves a sum exact
                sum_lo = _mm_add_pd(sum_lo, _mm_cvtps_pd(at[s]));
                sum_hi = _mm_add_pd(sum_hi, _mm_cvtps_pd(_mm_movehl_ps(at[s], at[s])));
                count = _mm_sub_epi32(count, valid);
                const __m128i first = _mm_and_si128(valid, _mm_cmplt_epi32(end, zero));
                const __m128i t = _mm_set1_epi32(static_cast<int32_t>(t0 + s));
                end = _mm_or_si128(_mm_and_si128(first, t), _mm_andnot_si128(first, end));
            }
        }
        for (int k = 0; k < 4; ++k) {
            transpose4(at[4 * k], at[4 * k + 1], at[4 * k + 2], at[4 * k + 3]);
            transpose4(et[4 * k], et[4 * k + 1], et[4 * k + 2], et[4 * k + 3]);
        }
        for (int i = 0; i < 4; ++i) {
            for (int k = 0; k < 4; ++k) {
                _mm_storeu_ps(adv[i] + t0 + 4 * k, at[4 * k + i]);
                _mm_storeu_ps(ret[i] + t0 + 4 * k, et[4 * k + i]);
            }
        }
    }
    alignas(16) float next_lane[4], running_lane[4];
    alignas(16) double sums[4];
    alignas(16) int32_t counts[4], ends[4];
    _mm_store_ps(next_lane, next_value);
    _mm_store_ps(running_lane, running);
    _mm_store_pd(sums, sum_lo);
    _mm_store_pd(sums + 2, sum_hi);
    _mm_store_si128(reinterpret_cast<__m128i*>(counts), count);
    _mm_store_si128(reinterpret_cast<__m128i*>(ends), end);
    for (int i = 0; i < 4; ++i) {
        GaeRowState<float> state{next_lane[i], running_lane[i], sums[i], counts[i], ends[i]};
        const RowMoments row = gae_row_from(a, b0 + i, head, gamma_f, gamma_gae_lambda_f, state);
        if (Whiten) moments[i] = row;
    }
}
#else
constexpr bool kGaeVectorised = false;
#endif

template <typename T>
void gae_kernel(const GaeArgs<T>& a) {
    const index_t n = a.length;
    const T gamma = static_cast<T>(a.gamma);
    // The reference multiplies the Python floats first.
    const T gamma_gae_lambda = static_cast<T>(a.gamma * a.gae_lambda);
    const bool whiten = a.whiten.enabled;
    std::vector<RowMoments> moments(whiten ? static_cast<size_t>(a.batch) : 0);
    // float32 rows with unit column strides go four at a time (gae_rows4); the rest one by one.
    bool vectorised = false;
    if constexpr (std::is_same_v<T, float> && kGaeVectorised) {
        vectorised = a.rewards.col_stride == 1 && a.values.col_stride == 1 && a.mask.col_stride == 1 &&
                     n <= std::numeric_limits<int32_t>::max();
    }
    const index_t blocks = vectorised ? a.batch / 4 : 0;
    // The blocks, then the leftover rows, in one dynamically scheduled loop.
    const index_t units = blocks + (a.batch - blocks * 4);
    const index_t chunk = std::max<index_t>(rows_per_chunk(n) / (vectorised ? 4 : 1), 1);
#pragma omp parallel for schedule(dynamic, chunk) if (a.batch * n >= kParallelMinWork)
    for (index_t u = 0; u < units; ++u) {
        if (u < blocks) {
#ifdef __SSE2__
            if constexpr (std::is_same_v<T, float>) {
                RowMoments* m = whiten ? moments.data() + u * 4 : nullptr;
                if (whiten) {
                    gae_rows4<true>(a, u * 4, gamma, gamma_gae_lambda, m);
                } else {
                    gae_rows4<false>(a, u * 4, gamma, gamma_gae_lambda, m);
                }
            }
#endif
        } else {
            const index_t b = blocks * 4 + (u - blocks);
            const RowMoments row = gae_row_from(a, b, n, gamma, gamma_gae_lambda, GaeRowState<T>{});
            if (whiten) moments[b] = row;
        }
    }
    // The returns are targets of the critic: never whitened (verl whitens after computing them).
    if (whiten) whiten_rows(a.advantages, a.mask, a.batch, n, moments, a.whiten);
}

template <typename T>
void gae_typed(const py::object& rewards, const py::object& values, const py::object& mask,
               const py::object& advantages_out, const py::object& returns_out, index_t batch, index_t length,
               double gamma, double gae_lambda, const WhitenOptions& whiten) {
    const char* op = "gae";
    GaeArgs<T> a;
    a.rewards = input_matrix<T>(op, "rewards", rewards, batch, length);
    a.values = input_matrix<T>(op, "values", values, batch, length);
    a.mask = input_mask(op, mask, batch, length);
    a.advantages = output_array<T>(op, "advantages_out", advantages_out, {batch, length});
    a.returns = output_array<T>(op, "returns_out", returns_out, {batch, length});
    a.batch = batch;
    a.length = length;
    a.gamma = gamma;
    a.gae_lambda = gae_lambda;
    a.whiten = whiten;
    py::gil_scoped_release nogil;
    gae_kernel(a);
}

void gae(const py::object& rewards, const py::object& values, const py::object& mask,
         const py::object& advantages_out, const py::object& returns_out, double gamma, double gae_lambda,
         bool whiten, const std::string& whiten_variance, bool whiten_shift_mean) {
    const char* op = "gae";
    py::array first = get_array(op, "rewards", rewards);
    check_finite(op, "gamma", gamma);
    check_finite(op, "gae_lambda", gae_lambda);
    const WhitenOptions w = parse_whiten(op, whiten, whiten_variance, whiten_shift_mean);
    const std::pair<index_t, index_t> shape = batch_and_length(op, "rewards", first);
    const index_t batch = shape.first, length = shape.second;
    if (is_float64(op, "rewards", first)) {
        gae_typed<double>(rewards, values, mask, advantages_out, returns_out, batch, length, gamma, gae_lambda, w);
    } else {
        gae_typed<float>(rewards, values, mask, advantages_out, returns_out, batch, length, gamma, gae_lambda, w);
    }
}

// ---------------------------------------------------------------------------------------------
// safe_advantages

template <typename T>
struct SafeArgs {
    Matrix<T> logprobs, ref_logprobs, reward_values, cost_values;
    Matrix<uint8_t> mask;
    Vector<T> reward_scores, cost_scores;
    T *advantages, *reward_advantages, *cost_advantages, *reward_returns, *cost_returns, *kl;
    index_t batch, length;
    double kl_coef, multiplier, gamma, gae_lambda, score_clip;
    bool kl_in_cost, divide_by_one_plus_lambda, clip_before_kl;
    WhitenOptions whiten;
};

// The per-token scalars of one call, in the compute type.
template <typename T>
struct SafeCoefficients {
    // clip bounds the per-token totals; with clip_before_kl it is +inf (a no-op) and the scores
    // are clamped once per row instead.
    T neg_kl_coef, kl_coef, gamma, gamma_gae_lambda, multiplier, denominator, clip, score_clip;
};

// One right-to-left sweep over row b: KL, shaped reward/cost, both GAE streams, combination.
// Returns the row's moments of the combined advantage when whitening.
//
// Every coefficient is copied into a local and the outputs are __restrict: otherwise each float
// store could alias a float coefficient and force a reload per token. The serial dependency is
// one multiply-add per stream per token; everything else overlaps with it.
template <typename T, KlEstimator E, bool KlInCost>
RowMoments safe_row(const SafeArgs<T>& a, const SafeCoefficients<T> k, index_t b) {
    const index_t n = a.length;
    const T* logprobs = a.logprobs.row(b);
    const T* ref_logprobs = a.ref_logprobs.row(b);
    const T* reward_values = a.reward_values.row(b);
    const T* cost_values = a.cost_values.row(b);
    const uint8_t* mask = a.mask.row(b);
    const index_t ls = a.logprobs.col_stride, rls = a.ref_logprobs.col_stride;
    const index_t rvs = a.reward_values.col_stride, cvs = a.cost_values.col_stride, ms = a.mask.col_stride;
    T* __restrict advantages = a.advantages + b * n;
    T* __restrict reward_advantages = a.reward_advantages + b * n;
    T* __restrict cost_advantages = a.cost_advantages + b * n;
    T* __restrict reward_returns = a.reward_returns + b * n;
    T* __restrict cost_returns = a.cost_returns + b * n;
    T* __restrict kl_out = a.kl + b * n;
    const T neg_kl_coef = k.neg_kl_coef, kl_coef = k.kl_coef, gamma = k.gamma;
    const T gamma_gae_lambda = k.gamma_gae_lambda;
    const T multiplier = k.multiplier, denominator = k.denominator, clip = k.clip;
    const bool whiten = a.whiten.enabled;

    auto zero = [&](index_t t) {
        advantages[t] = reward_advantages[t] = cost_advantages[t] = T(0);
        reward_returns[t] = cost_returns[t] = kl_out[t] = T(0);
    };

    // The row's end is its last valid position; everything after it is zero.
    index_t end = n - 1;
    while (end >= 0 && !mask[end * ms]) --end;
    for (index_t t = end + 1; t < n; ++t) zero(t);
    RowMoments moments;
    if (end < 0) return moments;  // no valid token: all zeros

    T reward_next_value = 0, reward_running = 0, cost_next_value = 0, cost_running = 0;
    double sum = 0;
    index_t count = 0;
    // clamp(score, ±inf) is the score itself, so this is a no-op without clip_before_kl.
    const T reward_score = clamp(a.reward_scores[b], -k.score_clip, k.score_clip);
    const T cost_score = clamp(a.cost_scores[b], -k.score_clip, k.score_clip);

    // One valid token t. The scores enter only at the end (at_end is a compile-time flag), so the
    // common path carries no "+ 0" per token.
    auto step = [&](index_t t, auto at_end) {
        const T kl = kl_estimate<E>(logprobs[t * ls], ref_logprobs[t * rls]);
        T reward = neg_kl_coef * kl;
        T cost = KlInCost ? kl_coef * kl : T(0);
        if constexpr (decltype(at_end)::value) {
            reward = reward + reward_score;
            cost = cost + cost_score;
        }
        reward = clamp(reward, -clip, clip);
        cost = clamp(cost, -clip, clip);

        const T reward_value = reward_values[t * rvs];
        const T cost_value = cost_values[t * cvs];
        reward_running = (reward + gamma * reward_next_value - reward_value) + gamma_gae_lambda * reward_running;
        cost_running = (cost + gamma * cost_next_value - cost_value) + gamma_gae_lambda * cost_running;
        reward_next_value = reward_value;
        cost_next_value = cost_value;

        // denominator is 1 + λ with divide_by_one_plus_lambda, else exactly 1.
        const T advantage = (reward_running - multiplier * cost_running) / denominator;
        advantages[t] = advantage;
        reward_advantages[t] = reward_running;
        cost_advantages[t] = cost_running;
        reward_returns[t] = reward_running + reward_value;
        cost_returns[t] = cost_running + cost_value;
        kl_out[t] = kl;
        if (whiten) {
            sum += static_cast<double>(advantage);
            ++count;
        }
    };

    step(end, std::true_type{});
    for (index_t t = end - 1; t >= 0; --t) {
        if (mask[t * ms]) {
            step(t, std::false_type{});
        } else {
            zero(t);  // a hole: transparent, output 0
        }
    }

    if (whiten) moments = row_moments(advantages, mask, ms, end, sum, count);
    return moments;
}

template <typename T, KlEstimator E, bool KlInCost>
void safe_kernel(const SafeArgs<T>& a) {
    const T multiplier = static_cast<T>(sanitize_multiplier(a.multiplier));
    SafeCoefficients<T> k;
    k.neg_kl_coef = static_cast<T>(-a.kl_coef);
    k.kl_coef = static_cast<T>(a.kl_coef);
    k.gamma = static_cast<T>(a.gamma);
    k.gamma_gae_lambda = static_cast<T>(a.gamma * a.gae_lambda);
    k.multiplier = multiplier;
    k.denominator = a.divide_by_one_plus_lambda ? T(1) + multiplier : T(1);
    const T clip = static_cast<T>(a.score_clip);
    k.clip = a.clip_before_kl ? std::numeric_limits<T>::infinity() : clip;
    k.score_clip = a.clip_before_kl ? clip : std::numeric_limits<T>::infinity();

    const bool whiten = a.whiten.enabled;
    std::vector<RowMoments> moments(whiten ? static_cast<size_t>(a.batch) : 0);
    const index_t chunk = rows_per_chunk(a.length);
#pragma omp parallel for schedule(dynamic, chunk) if (a.batch * a.length >= kParallelMinWork)
    for (index_t b = 0; b < a.batch; ++b) {
        const RowMoments row = safe_row<T, E, KlInCost>(a, k, b);
        if (whiten) moments[b] = row;
    }
    if (whiten) whiten_rows(a.advantages, a.mask, a.batch, a.length, moments, a.whiten);
}

template <typename T>
void safe_typed(const py::object& logprobs, const py::object& ref_logprobs, const py::object& mask,
                const py::object& reward_scores, const py::object& cost_scores, const py::object& reward_values,
                const py::object& cost_values, const py::object& advantages, const py::object& reward_advantages,
                const py::object& cost_advantages, const py::object& reward_returns,
                const py::object& cost_returns, const py::object& kl, index_t batch, index_t length,
                double kl_coef, double multiplier, double gamma, double gae_lambda, KlEstimator estimator,
                double score_clip, bool kl_in_cost, bool divide_by_one_plus_lambda, bool clip_before_kl,
                const WhitenOptions& whiten) {
    const char* op = "safe_advantages";
    SafeArgs<T> a;
    a.logprobs = input_matrix<T>(op, "logprobs", logprobs, batch, length);
    a.ref_logprobs = input_matrix<T>(op, "ref_logprobs", ref_logprobs, batch, length);
    a.mask = input_mask(op, mask, batch, length);
    a.reward_scores = input_vector<T>(op, "reward_scores", reward_scores, batch);
    a.cost_scores = input_vector<T>(op, "cost_scores", cost_scores, batch);
    a.reward_values = input_matrix<T>(op, "reward_values", reward_values, batch, length);
    a.cost_values = input_matrix<T>(op, "cost_values", cost_values, batch, length);
    a.advantages = output_array<T>(op, "advantages", advantages, {batch, length});
    a.reward_advantages = output_array<T>(op, "reward_advantages", reward_advantages, {batch, length});
    a.cost_advantages = output_array<T>(op, "cost_advantages", cost_advantages, {batch, length});
    a.reward_returns = output_array<T>(op, "reward_returns", reward_returns, {batch, length});
    a.cost_returns = output_array<T>(op, "cost_returns", cost_returns, {batch, length});
    a.kl = output_array<T>(op, "kl", kl, {batch, length});
    a.batch = batch;
    a.length = length;
    a.kl_coef = kl_coef;
    a.multiplier = multiplier;
    a.gamma = gamma;
    a.gae_lambda = gae_lambda;
    a.score_clip = score_clip;
    a.kl_in_cost = kl_in_cost;
    a.divide_by_one_plus_lambda = divide_by_one_plus_lambda;
    a.clip_before_kl = clip_before_kl;
    a.whiten = whiten;

    py::gil_scoped_release nogil;
    with_estimator(estimator, [&](auto estimator_tag) {
        constexpr KlEstimator E = decltype(estimator_tag)::value;
        if (kl_in_cost) {
            safe_kernel<T, E, true>(a);
        } else {
            safe_kernel<T, E, false>(a);
        }
    });
}

void safe_advantages(const py::object& logprobs, const py::object& ref_logprobs, const py::object& mask,
                     const py::object& reward_scores, const py::object& cost_scores,
                     const py::object& reward_values, const py::object& cost_values,
                     const py::object& advantages, const py::object& reward_advantages,
                     const py::object& cost_advantages, const py::object& reward_returns,
                     const py::object& cost_returns, const py::object& kl, double kl_coef,
                     double lagrange_multiplier, double gamma, double gae_lambda, const std::string& kl_estimator,
                     double score_clip, bool kl_in_cost, bool divide_by_one_plus_lambda, bool whiten,
                     bool clip_before_kl, const std::string& whiten_variance, bool whiten_shift_mean) {
    const char* op = "safe_advantages";
    py::array first = get_array(op, "logprobs", logprobs);
    const KlEstimator estimator = parse_estimator(op, kl_estimator);
    const WhitenOptions w = parse_whiten(op, whiten, whiten_variance, whiten_shift_mean);
    check_finite(op, "kl_coef", kl_coef);
    check_finite(op, "gamma", gamma);
    check_finite(op, "gae_lambda", gae_lambda);
    check_score_clip(op, score_clip);
    const std::pair<index_t, index_t> shape = batch_and_length(op, "logprobs", first);
    const index_t batch = shape.first, length = shape.second;
    auto run = [&](auto type_tag) {
        using T = decltype(type_tag);
        safe_typed<T>(logprobs, ref_logprobs, mask, reward_scores, cost_scores, reward_values, cost_values,
                      advantages, reward_advantages, cost_advantages, reward_returns, cost_returns, kl, batch,
                      length, kl_coef, lagrange_multiplier, gamma, gae_lambda, estimator, score_clip, kl_in_cost,
                      divide_by_one_plus_lambda, clip_before_kl, w);
    };
    if (is_float64(op, "logprobs", first)) {
        run(double{});
    } else {
        run(float{});
    }
}

// ---------------------------------------------------------------------------------------------
// rloo_advantages

template <typename T>
struct RlooArgs {
    Matrix<T> logprobs, ref_logprobs;
    Matrix<uint8_t> mask;
    Vector<T> reward_scores, cost_scores;
    T *advantages, *returns, *kl;
    index_t batch, length, group_size;
    double kl_coef, multiplier, score_clip;
};

// Σ_t mask·kl_t over one row. Four double accumulators break the add dependency chain (and are
// more accurate than the reference's float32 sum); masked tokens are selected away, never branched.
template <typename T, KlEstimator E>
double row_kl_sum(const T* logprobs, index_t ls, const T* ref_logprobs, index_t rls, const uint8_t* mask,
                  index_t ms, index_t n) {
    double acc[4] = {0, 0, 0, 0};
    index_t t = 0;
    for (; t + 4 <= n; t += 4) {
        for (int j = 0; j < 4; ++j) {
            const T kl = kl_estimate<E>(logprobs[(t + j) * ls], ref_logprobs[(t + j) * rls]);
            acc[j] += mask[(t + j) * ms] ? static_cast<double>(kl) : 0.0;
        }
    }
    for (; t < n; ++t) {
        const T kl = kl_estimate<E>(logprobs[t * ls], ref_logprobs[t * rls]);
        acc[0] += mask[t * ms] ? static_cast<double>(kl) : 0.0;
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

template <typename T, KlEstimator E>
void rloo_kernel(const RlooArgs<T>& a) {
    const T kl_coef = static_cast<T>(a.kl_coef);
    const T multiplier = static_cast<T>(sanitize_multiplier(a.multiplier));
    const T clip = static_cast<T>(a.score_clip);
    const index_t chunk = rows_per_chunk(a.length);

    // Phase 1, per row: KL_i and G_i = clamp(reward_i - β·KL_i, ±clip) - λ·cost_i.
#pragma omp parallel for schedule(dynamic, chunk) if (a.batch * a.length >= kParallelMinWork)
    for (index_t b = 0; b < a.batch; ++b) {
        const T kl = static_cast<T>(row_kl_sum<T, E>(a.logprobs.row(b), a.logprobs.col_stride, a.ref_logprobs.row(b),
                                                     a.ref_logprobs.col_stride, a.mask.row(b), a.mask.col_stride,
                                                     a.length));
        const T shaped = clamp(a.reward_scores[b] - kl_coef * kl, -clip, clip);
        a.kl[b] = kl;
        a.returns[b] = shaped - multiplier * a.cost_scores[b];
    }

    // Phase 2, per group of k adjacent rows: A_i = G_i - (Σ_group G - G_i)/(k - 1).
    const index_t k = a.group_size;
    const index_t groups = k > 0 ? a.batch / k : 0;
    const double others = static_cast<double>(k - 1);
#pragma omp parallel for schedule(static) if (a.batch >= kParallelMinWork)
    for (index_t g = 0; g < groups; ++g) {
        const T* returns = a.returns + g * k;
        T* advantages = a.advantages + g * k;
        double sum = 0;
        for (index_t i = 0; i < k; ++i) sum += static_cast<double>(returns[i]);
        for (index_t i = 0; i < k; ++i) {
            const double own = static_cast<double>(returns[i]);
            advantages[i] = static_cast<T>(own - (sum - own) / others);
        }
    }
}

template <typename T>
void rloo_typed(const py::object& logprobs, const py::object& ref_logprobs, const py::object& mask,
                const py::object& reward_scores, const py::object& cost_scores, const py::object& advantages,
                const py::object& returns, const py::object& kl, index_t batch, index_t length,
                index_t group_size, double kl_coef, double multiplier, KlEstimator estimator, double score_clip) {
    const char* op = "rloo_advantages";
    RlooArgs<T> a;
    a.logprobs = input_matrix<T>(op, "logprobs", logprobs, batch, length);
    a.ref_logprobs = input_matrix<T>(op, "ref_logprobs", ref_logprobs, batch, length);
    a.mask = input_mask(op, mask, batch, length);
    a.reward_scores = input_vector<T>(op, "reward_scores", reward_scores, batch);
    a.cost_scores = input_vector<T>(op, "cost_scores", cost_scores, batch);
    a.advantages = output_array<T>(op, "advantages", advantages, {batch});
    a.returns = output_array<T>(op, "returns", returns, {batch});
    a.kl = output_array<T>(op, "kl", kl, {batch});
    a.batch = batch;
    a.length = length;
    a.group_size = group_size;
    a.kl_coef = kl_coef;
    a.multiplier = multiplier;
    a.score_clip = score_clip;

    py::gil_scoped_release nogil;
    with_estimator(estimator, [&](auto estimator_tag) {
        rloo_kernel<T, decltype(estimator_tag)::value>(a);
    });
}

void rloo_advantages(const py::object& logprobs, const py::object& ref_logprobs, const py::object& mask,
                     const py::object& reward_scores, const py::object& cost_scores,
                     const py::object& advantages, const py::object& returns, const py::object& kl,
                     int64_t group_size, double kl_coef, double lagrange_multiplier,
                     const std::string& kl_estimator, double score_clip) {
    const char* op = "rloo_advantages";
    py::array first = get_array(op, "logprobs", logprobs);
    const KlEstimator estimator = parse_estimator(op, kl_estimator);
    check_finite(op, "kl_coef", kl_coef);
    check_score_clip(op, score_clip);
    const std::pair<index_t, index_t> shape = batch_and_length(op, "logprobs", first);
    const index_t batch = shape.first, length = shape.second;
    check(group_size >= 2, [&] { return prefix(op, "group_size") + " must be >= 2, got " + std::to_string(group_size); });
    check(batch % group_size == 0, [&] { return prefix(op, "group_size") + "=" + std::to_string(group_size) +
                                         " must divide the batch size B=" + std::to_string(batch); });
    if (is_float64(op, "logprobs", first)) {
        rloo_typed<double>(logprobs, ref_logprobs, mask, reward_scores, cost_scores, advantages, returns, kl, batch,
                           length, group_size, kl_coef, lagrange_multiplier, estimator, score_clip);
    } else {
        rloo_typed<float>(logprobs, ref_logprobs, mask, reward_scores, cost_scores, advantages, returns, kl, batch,
                          length, group_size, kl_coef, lagrange_multiplier, estimator, score_clip);
    }
}

// ---------------------------------------------------------------------------------------------
// group_advantages: rloo (rloo_advantages' opt-in options), grpo, dr_grpo, reinforce_pp
// (reference.group_advantages / reference.rloo_advantages). Groups arrive as dense ids in [0, B)
// (the op layer's stable-sort densification), so uneven, non-contiguous groups need no hashing.

enum class GroupEstimator { rloo, grpo, dr_grpo, reinforce_pp };

template <typename T>
struct GroupArgs {
    Matrix<T> logprobs, ref_logprobs;
    Matrix<uint8_t> mask;
    Vector<T> reward_scores, cost_scores;
    const int64_t* group_ids = nullptr;  // (B,) contiguous; null for reinforce_pp
    T *advantages, *returns, *kl;
    index_t batch, length;
    GroupEstimator estimator;
    double kl_coef, multiplier, score_clip, eps;
    bool clip_before_kl, mask_nan, population, per_token;
};

template <typename T>
inline bool scorable(const GroupArgs<T>& a, index_t b) {
    return !a.mask_nan || !(std::isnan(a.reward_scores[b]) || std::isnan(a.cost_scores[b]));
}

// rloo / grpo / dr_grpo: G_i per row, then per-group count, sum (and Σ (G - mean)² for grpo) in
// double, then each row's advantage; per_token broadcasts A and G over the row's valid positions.
template <typename T, KlEstimator E>
void sequence_group_kernel(const GroupArgs<T>& a) {
    const T kl_coef = static_cast<T>(a.kl_coef);
    const T multiplier = static_cast<T>(sanitize_multiplier(a.multiplier));
    const T clip = static_cast<T>(a.score_clip);
    const index_t n = a.length, chunk = rows_per_chunk(n);
    std::vector<T> returns(static_cast<size_t>(a.batch)), kl_sums(static_cast<size_t>(a.batch));

#pragma omp parallel for schedule(dynamic, chunk) if (a.batch * n >= kParallelMinWork)
    for (index_t b = 0; b < a.batch; ++b) {
        const T* logprobs = a.logprobs.row(b);
        const T* ref_logprobs = a.ref_logprobs.row(b);
        const uint8_t* mask = a.mask.row(b);
        const index_t ls = a.logprobs.col_stride, rls = a.ref_logprobs.col_stride, ms = a.mask.col_stride;
        T kl;
        if (a.per_token) {  // the row's estimates once, summed in row_kl_sum's order (masked entries add 0)
            T* __restrict kl_out = a.kl + b * n;
            double acc[4] = {0, 0, 0, 0};
            for (index_t t = 0; t < n; ++t) {
                kl_out[t] = mask[t * ms] ? kl_estimate<E>(logprobs[t * ls], ref_logprobs[t * rls]) : T(0);
                acc[t < (n & ~index_t(3)) ? t % 4 : 0] += static_cast<double>(kl_out[t]);
            }
            kl = static_cast<T>((acc[0] + acc[1]) + (acc[2] + acc[3]));
        } else {
            kl = static_cast<T>(row_kl_sum<T, E>(logprobs, ls, ref_logprobs, rls, mask, ms, n));
        }
        const T reward = a.reward_scores[b];
        const T shaped = a.clip_before_kl ? clamp(reward, -clip, clip) - kl_coef * kl
                                          : clamp(reward - kl_coef * kl, -clip, clip);
        kl_sums[b] = kl;
        returns[b] = shaped - multiplier * a.cost_scores[b];
    }

    // O(B) and serial: the per-group statistics.
    std::vector<double> count(static_cast<size_t>(a.batch)), sum(static_cast<size_t>(a.batch));
    std::vector<double> mean, squares;
    for (index_t b = 0; b < a.batch; ++b) {
        if (!scorable(a, b)) continue;
        count[a.group_ids[b]] += 1;
        sum[a.group_ids[b]] += static_cast<double>(returns[b]);
    }
    if (a.estimator != GroupEstimator::rloo) {
        mean.assign(static_cast<size_t>(a.batch), 0.0);  // a group of one: mean 0 (verl)
        for (index_t g = 0; g < a.batch; ++g) {
            if (count[g] >= 2) mean[g] = sum[g] / count[g];
        }
    }
    if (a.estimator == GroupEstimator::grpo) {
        squares.assign(static_cast<size_t>(a.batch), 0.0);
        for (index_t b = 0; b < a.batch; ++b) {
            if (!scorable(a, b)) continue;
            const double centred = static_cast<double>(returns[b]) - mean[a.group_ids[b]];
            squares[a.group_ids[b]] += centred * centred;
        }
    }

#pragma omp parallel for schedule(dynamic, chunk) if (a.per_token && a.batch * n >= kParallelMinWork)
    for (index_t b = 0; b < a.batch; ++b) {
        const index_t g = a.group_ids[b];
        const double own = static_cast<double>(returns[b]);
        double advantage = 0;
        if (scorable(a, b)) {
            if (a.estimator == GroupEstimator::rloo) {
                const double others = count[g] - 1;  // no other member: baseline 0 (verl's size-1 rule)
                advantage = own - (others > 0 ? (sum[g] - own) / others : 0.0);
            } else if (a.estimator == GroupEstimator::dr_grpo) {
                advantage = own - mean[g];
            } else {  // grpo: unbiased std (torch.std), 1 for a group of one
                const double std_dev = count[g] >= 2 ? std::sqrt(squares[g] / (count[g] - 1)) : 1.0;
                advantage = (own - mean[g]) / (std_dev + a.eps);
            }
        }
        const T advantage_t = static_cast<T>(advantage);
        if (!a.per_token) {
            a.advantages[b] = advantage_t;
            a.returns[b] = returns[b];
            a.kl[b] = kl_sums[b];
            continue;
        }
        const uint8_t* mask = a.mask.row(b);
        const index_t ms = a.mask.col_stride;
        T* __restrict advantages = a.advantages + b * n;
        T* __restrict returns_out = a.returns + b * n;
        const T row_return = returns[b];
        for (index_t t = 0; t < n; ++t) {
            const bool valid = mask[t * ms] != 0;
            advantages[t] = valid ? advantage_t : T(0);
            returns_out[t] = valid ? row_return : T(0);
        }
    }
}

// reinforce_pp: one right-to-left sweep per row gives the per-token kl, rewards and returns
// R_t = Σ_{s >= t} r_s (γ = 1; holes carry R through) and the row's moments of R (scorable rows
// only); Chan's combination gives the batch mean/variance; a second pass whitens.
template <typename T, KlEstimator E>
void reinforce_pp_kernel(const GroupArgs<T>& a) {
    const T neg_kl_coef = static_cast<T>(-a.kl_coef);
    const T multiplier = static_cast<T>(sanitize_multiplier(a.multiplier));
    const T clip = static_cast<T>(a.score_clip);
    const index_t n = a.length, chunk = rows_per_chunk(n);
    std::vector<RowMoments> moments(static_cast<size_t>(a.batch));

#pragma omp parallel for schedule(dynamic, chunk) if (a.batch * n >= kParallelMinWork)
    for (index_t b = 0; b < a.batch; ++b) {
        const T* logprobs = a.logprobs.row(b);
        const T* ref_logprobs = a.ref_logprobs.row(b);
        const uint8_t* mask = a.mask.row(b);
        const index_t ls = a.logprobs.col_stride, rls = a.ref_logprobs.col_stride, ms = a.mask.col_stride;
        T* __restrict returns = a.returns + b * n;
        T* __restrict kl_out = a.kl + b * n;
        index_t end = n - 1;
        while (end >= 0 && !mask[end * ms]) --end;
        const T reward = a.clip_before_kl ? clamp(a.reward_scores[b], -clip, clip) : a.reward_scores[b];
        const T cost = multiplier * a.cost_scores[b];
        T running = 0;
        double sum = 0, count = 0;
        for (index_t t = n - 1; t >= 0; --t) {
            if (!mask[t * ms]) {
                returns[t] = kl_out[t] = T(0);
                continue;
            }
            const T kl = kl_estimate<E>(logprobs[t * ls], ref_logprobs[t * rls]);
            T r = neg_kl_coef * kl;
            if (t == end) r = r + reward;
            if (!a.clip_before_kl) r = clamp(r, -clip, clip);  // per token, like safe_advantages
            if (t == end) r = r - cost;
            running = running + r;
            returns[t] = running;
            kl_out[t] = kl;
            sum += static_cast<double>(running);
            count += 1;
        }
        if (scorable(a, b)) moments[b] = row_moments(returns, mask, ms, end, sum, static_cast<index_t>(count));
    }

    const RowMoments total = combine_moments(moments);
    const double scale =
        whiten_scale(total, a.population ? WhitenVariance::population : WhitenVariance::unbiased, a.eps);
    const T mean = static_cast<T>(total.mean);
    const T scale_t = static_cast<T>(scale);
#pragma omp parallel for schedule(dynamic, chunk) if (a.batch * n >= kParallelMinWork)
    for (index_t b = 0; b < a.batch; ++b) {
        const uint8_t* mask = a.mask.row(b);
        const index_t ms = a.mask.col_stride;
        const T* returns = a.returns + b * n;
        T* __restrict advantages = a.advantages + b * n;
        const bool counted = scorable(a, b);
        for (index_t t = 0; t < n; ++t) {
            advantages[t] = counted && mask[t * ms] ? (returns[t] - mean) * scale_t : T(0);
        }
    }
}

GroupEstimator parse_group_estimator(const char* op, const std::string& name) {
    if (name == "rloo") return GroupEstimator::rloo;
    if (name == "grpo") return GroupEstimator::grpo;
    if (name == "dr_grpo") return GroupEstimator::dr_grpo;
    if (name == "reinforce_pp") return GroupEstimator::reinforce_pp;
    throw std::invalid_argument(prefix(op, "estimator") +
                                " must be one of ('rloo', 'grpo', 'dr_grpo', 'reinforce_pp'), got '" + name + "'");
}

template <typename T>
void group_typed(GroupArgs<T>& a, const py::object& logprobs, const py::object& ref_logprobs,
                 const py::object& mask, const py::object& reward_scores, const py::object& cost_scores,
                 const py::object& group_ids, const py::object& advantages, const py::object& returns,
                 const py::object& kl, KlEstimator estimator) {
    const char* op = "group_advantages";
    const index_t batch = a.batch, length = a.length;
    a.logprobs = input_matrix<T>(op, "logprobs", logprobs, batch, length);
    a.ref_logprobs = input_matrix<T>(op, "ref_logprobs", ref_logprobs, batch, length);
    a.mask = input_mask(op, mask, batch, length);
    a.reward_scores = input_vector<T>(op, "reward_scores", reward_scores, batch);
    a.cost_scores = input_vector<T>(op, "cost_scores", cost_scores, batch);
    const bool per_token = a.per_token || a.estimator == GroupEstimator::reinforce_pp;
    if (per_token) {
        a.advantages = output_array<T>(op, "advantages", advantages, {batch, length});
        a.returns = output_array<T>(op, "returns", returns, {batch, length});
        a.kl = output_array<T>(op, "kl", kl, {batch, length});
    } else {
        a.advantages = output_array<T>(op, "advantages", advantages, {batch});
        a.returns = output_array<T>(op, "returns", returns, {batch});
        a.kl = output_array<T>(op, "kl", kl, {batch});
    }
    if (a.estimator != GroupEstimator::reinforce_pp) {
        py::array ids = get_array(op, "group_ids", group_ids);
        check_shape(op, "group_ids", ids, {batch});
        check(py::isinstance<py::array_t<int64_t>>(ids) && (ids.flags() & py::array::c_style) != 0,
              [&] { return prefix(op, "group_ids") + " must be a C-contiguous int64 array, got " + dtype_string(ids); });
        a.group_ids = static_cast<const int64_t*>(ids.data());
        for (index_t b = 0; b < batch; ++b) {
            const int64_t g = a.group_ids[b];
            check(g >= 0 && g < batch, [&] {
                return prefix(op, "group_ids") + " must lie in [0, B) (dense ids), got " + std::to_string(g) +
                       " at row " + std::to_string(b);
            });
        }
    }

    py::gil_scoped_release nogil;
    with_estimator(estimator, [&](auto estimator_tag) {
        constexpr KlEstimator E = decltype(estimator_tag)::value;
        if (a.estimator == GroupEstimator::reinforce_pp) {
            reinforce_pp_kernel<T, E>(a);
        } else {
            sequence_group_kernel<T, E>(a);
        }
    });
}

void group_advantages(const py::object& logprobs, const py::object& ref_logprobs, const py::object& mask,
                      const py::object& reward_scores, const py::object& cost_scores, const py::object& group_ids,
                      const py::object& advantages, const py::object& returns, const py::object& kl,
                      const std::string& estimator, double kl_coef, double lagrange_multiplier,
                      const std::string& kl_estimator, double score_clip, bool clip_before_kl, bool mask_nan_rewards,
                      double eps, bool population, bool per_token) {
    const char* op = "group_advantages";
    py::array first = get_array(op, "logprobs", logprobs);
    const KlEstimator kl_kind = parse_estimator(op, kl_estimator);
    const GroupEstimator kind = parse_group_estimator(op, estimator);
    check_finite(op, "kl_coef", kl_coef);
    check_score_clip(op, score_clip);
    check(std::isfinite(eps) && eps >= 0, [&] { return prefix(op, "eps") + " must be finite and >= 0, got " +
                                                       number_string(eps); });
    const std::pair<index_t, index_t> shape = batch_and_length(op, "logprobs", first);
    auto run = [&](auto type_tag) {
        using T = decltype(type_tag);
        GroupArgs<T> a;
        a.batch = shape.first;
        a.length = shape.second;
        a.estimator = kind;
        a.kl_coef = kl_coef;
        a.multiplier = lagrange_multiplier;
        a.score_clip = score_clip;
        a.eps = eps;
        a.clip_before_kl = clip_before_kl;
        a.mask_nan = mask_nan_rewards;
        a.population = population;
        a.per_token = per_token;
        group_typed<T>(a, logprobs, ref_logprobs, mask, reward_scores, cost_scores, group_ids, advantages, returns,
                       kl, kl_kind);
    };
    if (is_float64(op, "logprobs", first)) {
        run(double{});
    } else {
        run(float{});
    }
}

}  // namespace

void register_advantages(py::module_& m) {
    m.def("gae", &gae, py::kw_only(), py::arg("rewards"), py::arg("values"), py::arg("mask"),
          py::arg("advantages_out"), py::arg("returns_out"), py::arg("gamma"), py::arg("gae_lambda"),
          py::arg("whiten") = false, py::arg("whiten_variance") = "unbiased", py::arg("whiten_shift_mean") = true,
          "GAE over the valid positions of each row (docs/ops.md#gae), written into the contiguous outputs.\n"
          "rewards, values: (B, T) float32/float64, any strides; mask: (B, T) bool. whiten: the advantages\n"
          "are whitened over all valid tokens in place (whiten_variance 'unbiased' | 'population' | 'none').");
    m.def("safe_advantages", &safe_advantages, py::kw_only(), py::arg("logprobs"), py::arg("ref_logprobs"),
          py::arg("mask"), py::arg("reward_scores"), py::arg("cost_scores"), py::arg("reward_values"),
          py::arg("cost_values"), py::arg("advantages"), py::arg("reward_advantages"), py::arg("cost_advantages"),
          py::arg("reward_returns"), py::arg("cost_returns"), py::arg("kl"), py::arg("kl_coef"),
          py::arg("lagrange_multiplier"), py::arg("gamma"), py::arg("gae_lambda"), py::arg("kl_estimator"),
          py::arg("score_clip"), py::arg("kl_in_cost"), py::arg("divide_by_one_plus_lambda"), py::arg("whiten"),
          py::arg("clip_before_kl") = false, py::arg("whiten_variance") = "unbiased",
          py::arg("whiten_shift_mean") = true,
          "KL-penalised reward - λ·cost advantages (docs/ops.md#safe_advantages) in one sweep per row, written\n"
          "into the six contiguous (B, T) outputs. score_clip=math.inf disables clipping.");
    m.def("rloo_advantages", &rloo_advantages, py::kw_only(), py::arg("logprobs"), py::arg("ref_logprobs"),
          py::arg("mask"), py::arg("reward_scores"), py::arg("cost_scores"), py::arg("advantages"),
          py::arg("returns"), py::arg("kl"), py::arg("group_size"), py::arg("kl_coef"), py::arg("lagrange_multiplier"),
          py::arg("kl_estimator"), py::arg("score_clip"),
          "Sequence-level leave-one-out advantages (docs/ops.md#rloo_advantages), written into the three\n"
          "contiguous (B,) outputs. score_clip=math.inf disables clipping.");
    m.def("group_advantages", &group_advantages, py::kw_only(), py::arg("logprobs"), py::arg("ref_logprobs"),
          py::arg("mask"), py::arg("reward_scores"), py::arg("cost_scores"), py::arg("group_ids"),
          py::arg("advantages"), py::arg("returns"), py::arg("kl"), py::arg("estimator"), py::arg("kl_coef"),
          py::arg("lagrange_multiplier"), py::arg("kl_estimator"), py::arg("score_clip"), py::arg("clip_before_kl"),
          py::arg("mask_nan_rewards"), py::arg("eps"), py::arg("population"), py::arg("per_token"),
          "Group-baseline advantages (docs/ops.md#group_advantages; estimator 'rloo' | 'grpo' | 'dr_grpo' |\n"
          "'reinforce_pp'), written into the three contiguous (B,) or (B, T) outputs. group_ids: (B,) int64\n"
          "dense ids in [0, B) (ignored for reinforce_pp). score_clip=math.inf disables clipping.");
}

}  // namespace hcrlhf
