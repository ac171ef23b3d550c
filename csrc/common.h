// Shared pieces of the CPU kernels: input dtypes, row loading, a vectorisable
// exp/log, thread plumbing and function multi-versioning. Torch-free.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef FASTPROBE_OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace fastprobe {

// Hot loops are compiled for AVX-512, AVX2 (+FMA) and plain x86-64 and picked at load
// time by CPU features (GCC function multi-versioning); other targets and compilers get one
// version (clang's target_clones, tried: clang 14 gave functions in an anonymous namespace
// resolvers that collide between source files, and its LTO link crashed; clang 19 built a module
// that cannot load, LseState's implicit constructor left undefined).
// Each comma-separated name is its own clone ("avx2,fma" would make an AVX2 clone
// without FMA and a 128-bit FMA one), so whole ISA levels are named where GCC knows
// them: x86-64-v4 = AVX-512 F/BW/DQ/VL, x86-64-v3 = AVX2, FMA, F16C, BMI.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTPROBE_NO_CLONES)
#define FASTPROBE_CLONES 1
#if __GNUC__ >= 12
#define FASTPROBE_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTPROBE_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#else
#define FASTPROBE_SIMD_CLONES
#endif

// With clones, FASTPROBE_AVX512 compiles a function for the first clone's target alone: code that
// runs only where runs_avx512_clone() (the 16-lane attention kernels, attention_core.h).
#ifdef FASTPROBE_CLONES
#if __GNUC__ >= 12
#define FASTPROBE_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define FASTPROBE_AVX512 __attribute__((target("avx512f")))
#endif
#endif

// FASTPROBE_AVX512_BF16: the AVX-512 target plus AVX512-BF16 (VDPBF16PS, the bf16 pair dot
// product), for code that runs only where runs_avx512_bf16() (the bf16 attention scores); not
// where CMakeLists.txt found the toolchain without it (FASTPROBE_NO_AVX512_BF16).
#if defined(FASTPROBE_CLONES) && __GNUC__ >= 12 && !defined(FASTPROBE_NO_AVX512_BF16)
#define FASTPROBE_AVX512_BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
#endif

// Whether this CPU runs the first (AVX-512) clone of the FASTPROBE_SIMD_CLONES functions.
inline bool runs_avx512_clone() {
#ifdef FASTPROBE_CLONES
  __builtin_cpu_init();
#if __GNUC__ >= 12
  return __builtin_cpu_supports("x86-64-v4");
#else
  return __builtin_cpu_supports("avx512f");
#endif
#else
  return false;
#endif
}

// Whether this CPU runs the AVX-512 clone and has AVX512-BF16 (FASTPROBE_AVX512_BF16 code).
inline bool runs_avx512_bf16() {
#ifdef FASTPROBE_AVX512_BF16
  return runs_avx512_clone() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// The version of the FASTPROBE_SIMD_CLONES functions that runs on this CPU (`fastprobe info`).
inline const char* simd_clone() {
#ifdef FASTPROBE_CLONES
  __builtin_cpu_init();  // (for the AVX2 check; runs_avx512_clone initialises too)
  if (runs_avx512_clone()) return __GNUC__ >= 12 ? "x86-64-v4 (AVX-512)" : "AVX-512F";
#if __GNUC__ >= 12
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2, FMA)";
#else
  if (__builtin_cpu_supports("avx2")) return "AVX2";
#endif
  return "x86-64 baseline (SSE2)";
#else
  return "the compiler's target (not multi-versioned)";
#endif
}

// For templates and helpers that a FASTPROBE_SIMD_CLONES function calls: inlined into each
// clone, so compiled for its target. Where GCC declines to inline (a body that grew), its one
// out-of-line copy is compiled for the default target: 4-wide SSE without FMA, 3x slower
// (concept_mass, 2026-12-01).
#define FASTPROBE_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNegInf = -kInf;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

// Rows are processed in blocks of this many elements, converted to float32 into
// a per-thread buffer: small enough to stay in L1/L2, large enough to amortise loops.
constexpr int64_t kBlock = 2048;

// Elements in the block of a row of V that starts at v0.
inline int64_t block_size(int64_t V, int64_t v0) { return std::min(kBlock, V - v0); }

enum class DType { Float32, BFloat16, Float16 };

inline DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::Float32;
  if (name == "bfloat16") return DType::BFloat16;
  if (name == "float16") return DType::Float16;
  throw std::invalid_argument("fastprobe._C: unsupported dtype '" + name +
                              "' (expected float32, bfloat16 or float16)");
}

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// bfloat16 is the top half of a float32.
inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// IEEE half -> float, branch-free so loops vectorise: shift exponent and mantissa
// into place, re-bias the exponent, fix up inf/NaN and subnormals.
inline float fp16_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t body = (uint32_t(h) & 0x7fffu) << 13;
  const uint32_t exp = body & shifted_exp;
  body += (127u - 15u) << 23;
  const bool inf_nan = exp == shifted_exp;
  const bool subnormal = exp == 0;
  body += inf_nan ? ((128u - 16u) << 23) : 0u;
  // subnormal: add one to the exponent and subtract the implicit 2^-14
  const float sub = bits_to_float(body + (1u << 23)) - bits_to_float(113u << 23);
  const uint32_t magnitude = subnormal ? float_to_bits(sub) : body;
  return bits_to_float(magnitude | ((uint32_t(h) & 0x8000u) << 16));
}

template <typename T>
inline float to_float(T x);
template <>
inline float to_float<float>(float x) { return x; }
struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };
template <>
inline float to_float<bf16>(bf16 x) { return bf16_to_float(x.bits); }
template <>
inline float to_float<fp16>(fp16 x) { return fp16_to_float(x.bits); }

// ---- float16 by the F16C instructions where the CPU has them (since Ivy Bridge / Piledriver;
// every x86-64-v3 CPU) ---------------------------------------------------------------------
// One vcvtph2ps / vcvtps2ph per 8 elements in place of ~12 integer and float operations per
// element; both conversions are exact IEEE (round to nearest even), as the portable code.
// These functions are called, not inlined, from the multi-versioned ones: the default clone
// may not contain AVX code, so the CPU is asked once, at the first call.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(FASTPROBE_NO_F16C)
#define FASTPROBE_F16C 1

// AVX usable (the CPU has it and the OS saves its registers) and F16C (CPUID.1:ECX), asked by
// cpuid: clang before 17 knows no "f16c" for __builtin_cpu_supports.
inline bool cpu_has_f16c() {
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __get_cpuid(1, &eax, &ebx, &ecx, &edx) &&
           (ecx & bit_F16C) != 0;
  }();
  return has;
}

// out[i] = float(src[i]) for i < count (contiguous).
__attribute__((target("avx,f16c"))) inline void f16c_load(const uint16_t* src, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(halves));
  }
  for (; i < count; ++i) out[i] = fp16_to_float(src[i]);
}
#endif

// out[i] = float(row[i * stride]) for i < count. The only read of the input;
// callers pass counts that stay inside the row.
template <typename T>
inline void load_floats(const T* row, int64_t stride, int64_t count, float* out) {
#ifdef FASTPROBE_F16C
  if constexpr (std::is_same_v<T, fp16>) {
    if (stride == 1 && cpu_has_f16c()) return f16c_load(reinterpret_cast<const uint16_t*>(row), count, out);
  }
#endif
  if (stride == 1) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) out[i] = to_float<T>(row[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = to_float<T>(row[i * stride]);
  }
}

// ---- Storing a float in the logits' dtype (round to nearest even), branch-free so
// loops vectorise. -------------------------------------------------------------------

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return uint16_t((bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40u : rounded);  // NaN: quiet
}

// float -> IEEE half: overflow to inf, NaN kept (quiet), subnormals rounded by an addition
// that lets the FPU do the rounding (F. Giesen's float_to_half_fast3_rtne, all three
// cases computed and one selected).
inline uint16_t float_to_fp16_bits(float f) {
  const uint32_t f32_infinity = 255u << 23;
  const uint32_t f16_overflow = (127u + 16u) << 23;  // 2^16: rounds to inf
  const uint32_t denormal_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t signed_bits = float_to_bits(f);
  const uint32_t sign = signed_bits & 0x80000000u;
  const uint32_t bits = signed_bits ^ sign;
  const uint32_t inf_nan = bits > f32_infinity ? 0x7e00u : 0x7c00u;  // NaN : inf
  // below 2^-14: subnormal or 0
  const uint32_t subnormal =
      float_to_bits(bits_to_float(bits) + bits_to_float(denormal_magic)) - denormal_magic;
  // normal: re-bias the exponent, round half to even
  const uint32_t mantissa_odd = (bits >> 13) & 1u;
  const uint32_t normal = (bits + (uint32_t(15 - 127) << 23) + 0xfffu + mantissa_odd) >> 13;
  const uint32_t half = bits >= f16_overflow ? inf_nan : bits < (113u << 23) ? subnormal : normal;
  return uint16_t(half | (sign >> 16));
}

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline bf16 from_float<bf16>(float x) { return bf16{float_to_bf16_bits(x)}; }
template <>
inline fp16 from_float<fp16>(float x) { return fp16{float_to_fp16_bits(x)}; }

#ifdef FASTPROBE_F16C
// out[i] = half(in[i]) for i < count, rounded to nearest even.
__attribute__((target("avx,f16c"))) inline void f16c_store(const float* in, int64_t count,
                                                           uint16_t* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i halves = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), halves);
  }
  for (; i < count; ++i) out[i] = float_to_fp16_bits(in[i]);
}
#endif

// out[i] = T(in[i]) for i < count (contiguous).
template <typename T>
inline void store_run(const float* in, int64_t count, T* out) {
#ifdef FASTPROBE_F16C
  if constexpr (std::is_same_v<T, fp16>) {
    if (cpu_has_f16c()) return f16c_store(in, count, reinterpret_cast<uint16_t*>(out));
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = from_float<T>(in[i]);
}

// ---- Loading by dtype: one multi-versioned entry per dtype, picked once per call. ----

// out[i] = float(base[first + i * stride]) for i < count.
using LoadFn = void (*)(const void* base, int64_t first, int64_t stride, int64_t count,
                        float* out);

FASTPROBE_SIMD_CLONES static void load_float32(const void* base, int64_t first, int64_t stride,
                                               int64_t count, float* out) {
  load_floats(static_cast<const float*>(base) + first, stride, count, out);
}

FASTPROBE_SIMD_CLONES static void load_bfloat16(const void* base, int64_t first, int64_t stride,
                                                int64_t count, float* out) {
  load_floats(static_cast<const bf16*>(base) + first, stride, count, out);
}

FASTPROBE_SIMD_CLONES static void load_float16(const void* base, int64_t first, int64_t stride,
                                               int64_t count, float* out) {
  load_floats(static_cast<const fp16*>(base) + first, stride, count, out);
}

static inline LoadFn loader_for(DType dtype) {
  switch (dtype) {
    case DType::Float32: return load_float32;
    case DType::BFloat16: return load_bfloat16;
    case DType::Float16: return load_float16;
  }
  throw std::invalid_argument("fastprobe._C: unsupported dtype");
}

// ---- Storing by dtype (gradients): float32 is formed in the output itself, so has none. ----

// base[first + i] = dtype(in[i]) for i < count, rounded to nearest even.
using StoreFn = void (*)(const float* in, int64_t count, void* base, int64_t first);

FASTPROBE_SIMD_CLONES static void store_bfloat16(const float* in, int64_t count, void* base, int64_t first) {
  store_run(in, count, static_cast<bf16*>(base) + first);
}

FASTPROBE_SIMD_CLONES static void store_float16(const float* in, int64_t count, void* base, int64_t first) {
  store_run(in, count, static_cast<fp16*>(base) + first);
}

// nullptr for float32.
static inline StoreFn storer_for(DType dtype) {
  switch (dtype) {
    case DType::Float32: return nullptr;
    case DType::BFloat16: return store_bfloat16;
    case DType::Float16: return store_float16;
  }
  throw std::invalid_argument("fastprobe._C: unsupported dtype");
}

// How one input's rows are read as float32: its loader, and whether it is float32 (rows with a
// unit stride are then read in place). The inputs of one call may differ in dtype: one each.
struct RowReader {
  LoadFn load;
  bool float32;

  static RowReader of(DType type) { return {loader_for(type), type == DType::Float32}; }

  // Elements [first, first + count) of a row (stride in elements) as float32: the input itself
  // when it is float32 with a unit stride, else converted into scratch by `load`.
  const float* block(const void* base, int64_t first, int64_t stride, int64_t count, float* scratch) const {
    if (float32 && stride == 1) return static_cast<const float*>(base) + first;
    load(base, first, stride, count, scratch);
    return scratch;
  }
};

// exp(x) for float32 x in [-87, 88], vectorisable: x = n ln2 + r with |r| <= ln2/2, exp(r) by
// a degree-7 Taylor polynomial (error < 1e-8 relative), 2^n built in the exponent bits. A NaN x
// gives NaN.
FASTPROBE_ALWAYS_INLINE float exp_in_range(float clamped) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = clamped * kLog2e + magic;
  const float n = shifted - magic;
  const int32_t ni = int32_t(float_to_bits(shifted)) - int32_t(float_to_bits(magic));
  const float r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_to_float(uint32_t(ni + 127) << 23);
}

// exp(x) for any float32 x: exp(-inf) = 0, anything below the float32 normal range flushes to
// 0, overflow saturates at exp(88); NaN stays NaN.
inline float fast_exp(float x) {
  const float low = x > -87.0f ? x : -87.0f;
  const float result = x < -87.0f ? 0.0f : exp_in_range(low < 88.0f ? low : 88.0f);
  return x == x ? result : x;
}

// exp(x) of a log-sum-exp's term, x = scale (x_i - max) <= 0 or NaN: fast_exp without its
// overflow clamp and its two selects. x below -87 (-inf included) gives exp(-87) ~ 1.6e-38, not
// 0, which no such sum can see (its max's term is 1); the clamp keeps a NaN (x < -87 is false).
inline float exp_of_lse_term(float x) { return exp_in_range(x < -87.0f ? -87.0f : x); }

// log(x) for finite x > 0, vectorisable: x = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log(m) = 2 atanh(s), s = (m-1)/(m+1), odd series to s^11 (|s| < 0.172, error < 1e-9).
// Subnormal x gives a finite (inexact) value; callers only use it multiplied by x.
inline float fast_log(float x) {
  const uint32_t bits = float_to_bits(x);
  int32_t e = int32_t((bits >> 23) & 0xffu) - 127;
  float m = bits_to_float((bits & 0x7fffffu) | 0x3f800000u);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e += big ? 1 : 0;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 2.0f / 11.0f;
  p = p * s2 + 2.0f / 9.0f;
  p = p * s2 + 2.0f / 7.0f;
  p = p * s2 + 2.0f / 5.0f;
  p = p * s2 + 2.0f / 3.0f;
  p = p * s2 + 2.0f;
  return float(e) * kLn2 + p * s;
}

// Online log-sum-exp of scale * x: max is the largest x, sum = sum exp(scale (x - max)),
// lse = scale * max + log(sum). A NaN sum (NaN or +inf in the input) gives a NaN lse;
// an empty sum (all -inf) gives -inf. The value is a double: scale * max is exact there
// (a product of two floats), so the lse keeps the precision of the row's largest logit at
// any magnitude (a float32 lse of logits ~1e4 would be off by up to 5e-4).
struct LseState {
  float max = kNegInf;
  float sum = 0.0f;
  double value(float scale) const {
    return sum == 0.0f ? -std::numeric_limits<double>::infinity()
                       : double(scale) * double(max) + std::log(double(sum));
  }
};

// lse_block adds a block's exp terms in float32 in runs of this many, and the runs' sums in
// double: a build that does not vectorise the loop (tests/sanitize.sh's) otherwise adds all
// kBlock terms in order, a relative error of up to ~7e-6 in the sum (~2e-6 with runs of 512);
// vectorised builds add kBlock / lanes terms per lane either way. (Runs of 128: ~9e-7, but 5-15%
// slower on AVX-512; a double sum of every term: 2-4x slower, the exp loop no longer vectorised
// as well. Runs of 512 against one float32 sum, paired raw _C calls on an idle 2-core AVX-512
// machine, 2026-12-02: concept_mass N = 1024 V = 32000 and N = 256 V = 128256 +5% on 2 threads,
// +3-4% on 1 (this for_runs form; the hand-written run loop before it was +10% on 1 thread, the
// same on 2); draft_divergence and bridge_loss +0-2%.)
constexpr int64_t kLseRun = 512;

// f(first, run_count) for each run of kLseRun elements of a block of `count`, in order: the
// other kernels that sum a block's terms in float32 (draft_divergence's, bridge_loss forward's)
// are called once per run, and the runs' sums added in double, for the same reason. (Cost, paired
// Release runs as above: draft_divergence -1.3..-2.9%, bridge_loss forward +1.0..+1.4%.)
template <typename F>
inline void for_runs(int64_t count, F&& f) {
  for (int64_t first = 0; first < count; first += kLseRun) f(first, std::min(kLseRun, count - first));
}

// Folds one block of float32 values into an online log-sum-exp of scale * x (scale > 0).
// Subtracting the max before scaling keeps x - max exact near the max, so large logits
// lose no precision. Multi-versioned, and called (not inlined) once per block and row: GCC
// would not inline a body this size twice into one clone, and its out-of-line copy would be
// compiled for the default target only.
[[maybe_unused]] FASTPROBE_SIMD_CLONES static void lse_block(LseState& state, const float* x, int64_t count,
                                                             float scale) {
  float block_max = kNegInf;
#pragma omp simd reduction(max : block_max)
  for (int64_t i = 0; i < count; ++i) block_max = x[i] > block_max ? x[i] : block_max;
  if (block_max == kNegInf) {  // all masked (-inf) or NaN: only a NaN contributes
    for (int64_t i = 0; i < count; ++i)
      if (x[i] != x[i]) state.sum = x[i];
    return;
  }
  const float new_max = state.max > block_max ? state.max : block_max;
  double block_sum = 0.0;  // sum_i exp(scale (x_i - max)): float32 runs of kLseRun terms, added in double
  for_runs(count, [&](int64_t first, int64_t run) {
    const float* xs = x + first;
    float run_sum = 0.0f;
#pragma omp simd reduction(+ : run_sum)
    for (int64_t i = 0; i < run; ++i) run_sum += exp_of_lse_term((xs[i] - new_max) * scale);
    block_sum += run_sum;
  });
  state.sum = state.sum * fast_exp((state.max - new_max) * scale) + float(block_sum);
  state.max = new_max;
}

// A row's vocabulary is folded in ranges of kRange logits, each into a fresh online
// log-sum-exp, merged in range order: the same bits however the ranges are spread over threads.
constexpr int64_t kRangeBlocks = 4;  // 8192 logits
constexpr int64_t kRange = kRangeBlocks * kBlock;

inline int64_t range_count(int64_t V) { return (V + kRange - 1) / kRange; }
// Range `range` of a row is [range * kRange, range_end(V, range)).
inline int64_t range_end(int64_t V, int64_t range) { return std::min(V, (range + 1) * kRange); }

// The blocks of range `range` of a row of V, in order: f(v0, count) for each [v0, v0 + count).
// For the drivers that call the multi-versioned kernels, not for use inside one (not forced inline).
template <typename F>
inline void for_blocks(int64_t V, int64_t range, F&& f) {
  for (int64_t v0 = range * kRange; v0 < range_end(V, range); v0 += kBlock) f(v0, block_size(V, v0));
}

// Merges the online log-sum-exp `part` (a later range) into `state`; a NaN in either stays.
inline void merge_lse(LseState& state, const LseState& part, float scale) {
  if (part.max == kNegInf) {  // nothing finite in the part: only a NaN counts
    if (part.sum != part.sum) state.sum = part.sum;
    return;
  }
  if (state.max == kNegInf) {  // (sum 0, or NaN, which stays)
    state = {part.max, state.sum != state.sum ? state.sum : part.sum};
    return;
  }
  const float max = std::max(state.max, part.max);
  state.sum = state.sum * fast_exp((state.max - max) * scale) + part.sum * fast_exp((part.max - max) * scale);
  state.max = max;
}

// Log-softmax of scale * x over one row: log_prob(x_v) = (x_v - shift) scale - offset, with
// shift near the row's largest logit, so x_v - shift is exact near the max and large logits
// keep float32 precision. A row with no finite logit (or a non-finite lse) gives NaN.
// log_prob forms (x - shift) scale as (x half - shift half) (scale / half): half = 1 (the same
// bits), or 1/2 in a row whose shift is over 2^100, where x - shift overflows to -inf for
// logits more than float max apart (3e38 and -3e38) though the product with a scale < 1
// (T > 1) need not (halving is exact; kernels/divergence.py's _scaled_difference). A row
// under 2^100 cannot overflow: shift - x <= 2^100 + float max rounds to float max.
struct LogSoftmax {
  float shift, scale, offset;
  float half, shift_half, scale_half;  // (log_prob's parts)

  // (out of line: inlined, GCC threads the two values of half into the loop that uses the
  // result, which then has control flow and stays scalar: concept_mass's per-concept loop did)
  __attribute__((noinline)) static LogSoftmax make(float shift, float scale, float offset) {
    const float half = shift > 0x1p100f ? 0.5f : 1.0f;
    return {shift, scale, offset, half, shift * half, scale / half};
  }
  // From an online log-sum-exp: shift = max, offset = log(sum).
  static LogSoftmax from_state(const LseState& state, float scale) {
    return make(state.max, scale, std::log(state.sum));
  }
};

inline float log_prob(const LogSoftmax& row, float x) {
  return (x * row.half - row.shift_half) * row.scale_half - row.offset;
}

// Per-thread float scratch: zeros, or NaN in the builds of tests/sanitize.sh
// (FASTPROBE_POISON_SCRATCH), where a value read before it is written shows in the outputs.
inline std::vector<float> scratch_floats(int64_t count) {
#ifdef FASTPROBE_POISON_SCRATCH
  return std::vector<float>(size_t(count), std::numeric_limits<float>::quiet_NaN());
#else
  return std::vector<float>(size_t(count));
#endif
}

// This thread's number in the enclosing OpenMP team (0 without OpenMP).
inline int thread_index() {
#ifdef FASTPROBE_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int clamp_threads(int64_t requested) {
  if (requested < 1) throw std::invalid_argument("fastprobe._C: num_threads must be >= 1");
  return int(requested > 1024 ? 1024 : requested);
}

// A job over N rows in stages, each row's state kept in a slot between them. A stage is
// each_part(count, step), step(n, part, slot, ws) for every part in [0, count) (a row's vocabulary
// ranges, its concept chunks), or each_row(step), step(n, slot, ws) once (merging the parts); ws is
// the thread's scratch from make_scratch(). Each thread takes whole rows, every stage of a row in
// turn (slot: the thread's number), unless split_rows: fewer rows than threads (decoding: one row a
// call), or fewer than twice as many and not a multiple of them, where whole rows would leave
// threads idle for a row's time (N = 3 on 2 threads, N = 65 on 64). Then each stage runs for all
// rows, its (row, part) steps spread over the threads, before the next begins (slot: the row; fewer
// than 2 x threads slots). A row runs the same steps on the same data either way, so its results
// are the same bits. Slots: row_slots(N, threads).
inline bool split_rows(int64_t N, int threads) { return N % threads != 0 && N < 2 * int64_t(threads); }
inline int64_t row_slots(int64_t N, int threads) { return split_rows(N, threads) ? N : threads; }

template <typename Step>
struct EachPart {
  int64_t count;
  Step step;
};
template <typename Step>
struct EachRow {
  Step step;
};
template <typename Step>
EachPart<Step> each_part(int64_t count, Step step) { return {count, step}; }
template <typename Step>
EachRow<Step> each_row(Step step) { return {step}; }

// The first exception thrown on any thread of an OpenMP parallel region, kept and rethrown after
// it (an exception that leaves the region calls std::terminate: a bad_alloc of a thread's scratch
// would abort Python instead of raising MemoryError). Every thread still runs each worksharing
// loop (its barrier), skipping the work once anything has failed.
class ThreadErrors {
 public:
  template <typename Work>
  void run(Work&& work) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return;
    try {
      work();
    } catch (...) {
#ifdef FASTPROBE_OPENMP
#pragma omp critical(fastprobe_thread_errors)
#endif
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};
};

// One stage of row n, whole rows per thread.
template <typename Step, typename Scratch>
void run_stage(const EachPart<Step>& stage, int64_t n, int64_t slot, Scratch& ws) {
  for (int64_t part = 0; part < stage.count; ++part) stage.step(n, part, slot, ws);
}
template <typename Step, typename Scratch>
void run_stage(const EachRow<Step>& stage, int64_t n, int64_t slot, Scratch& ws) {
  stage.step(n, slot, ws);
}

// One stage of all N rows spread over the threads of the enclosing parallel region (every thread
// calls it; the loop's implicit barrier ends the stage). ws: the thread's scratch (none if making
// it failed: the thread then only takes part in the loop).
template <typename Step, typename Scratch>
void run_stage_spread(const EachPart<Step>& stage, int64_t N, std::optional<Scratch>& ws, ThreadErrors& errors) {
  const int64_t count = stage.count;
#pragma omp for schedule(dynamic, 1)
  for (int64_t unit = 0; unit < N * count; ++unit)
    if (ws) errors.run([&] { stage.step(unit / count, unit % count, unit / count, *ws); });
}
template <typename Step, typename Scratch>
void run_stage_spread(const EachRow<Step>& stage, int64_t N, std::optional<Scratch>& ws, ThreadErrors& errors) {
#pragma omp for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    if (ws) errors.run([&] { stage.step(n, n, *ws); });
}

// Threads worth starting for `units` independent units of work. Entering and leaving an OpenMP
// parallel region costs ~0.5 us even on one thread and ~1.4 us on two (2026-12-02), as much as a
// decoding call's whole work: with one thread (one asked for, or one unit) a job runs inline on the
// calling thread, with no region. Which thread runs a unit never changes its results.
inline int team_size(int threads, int64_t units) {
  return int(std::max<int64_t>(1, std::min<int64_t>(threads, units)));
}

// A row job that reads fewer logits than this (draft_divergence's K or K + 1 rows a token,
// bridge_loss's two, concept_mass's one: N V each) runs on the calling thread, as kInlineWork does
// for attention. Below it two threads were slower at twice the CPU time (2026-12-08, 2 cores, idle,
// 2 / 1-thread medians of the C++ call: draft_divergence 1.20 at 640 logits, 1.62 at 2560, 1.00-1.04
// at 10k, 0.89 at 20k; bridge_loss 2.18 at 256, 1.15-1.25 at 4k, 0.98 at 8k, 0.80 at 16k); under
// load (5-7 on the 2 cores) the second thread's spin cost 6-20x a small call's CPU time and calls
// waited 12-41 ms (p99) for it to get a core. (concept_mass, cheaper a logit, gains only from ~40k;
// one threshold for all keeps bridge_loss's gain at 16k.)
constexpr double kInlineLogits = double(1 << 13);

// The units of a stage over N rows that the threads share when rows are spread.
template <typename Step>
int64_t stage_units(const EachPart<Step>& stage, int64_t N) { return N * stage.count; }
template <typename Step>
int64_t stage_units(const EachRow<Step>&, int64_t N) { return N; }

// `logits`: the logits the job reads; fewer than kInlineLogits run inline.
template <typename MakeScratch, typename... Stages>
void run_rows(int64_t N, int threads, double logits, MakeScratch make_scratch, const Stages&... stages) {
  const bool spread = split_rows(N, threads);
  // the units: whole rows, or (spread) the steps of the largest stage
  const int team =
      logits < kInlineLogits ? 1 : team_size(threads, spread ? std::max({stage_units(stages, N)...}) : N);
  if (team == 1) {  // inline, whole rows in turn in slot 0 (a row's results do not depend on the order
                    // of its stages against other rows'); an exception leaves as it came.
    if (N == 0) return;
    auto ws = make_scratch();
    for (int64_t n = 0; n < N; ++n) (run_stage(stages, n, 0, ws), ...);
    return;
  }
  ThreadErrors errors;
#pragma omp parallel num_threads(team)
  {
    std::optional<decltype(make_scratch())> ws;
    errors.run([&] { ws.emplace(make_scratch()); });
    if (!spread) {
      const int64_t slot = thread_index();
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n)
        if (ws) errors.run([&] { (run_stage(stages, n, slot, *ws), ...); });
    } else {
      (run_stage_spread(stages, N, ws, errors), ...);
    }
  }
  errors.rethrow();
}

// The inverse temperature as the float32 the kernels use: finite and > 0 there (a double
// such as 1e-50 would round to 0 and make every logit 0 * x).
inline float checked_inv_temperature(double inv_temperature) {
  const float inv_t = float(inv_temperature);
  if (!(inv_t > 0.0f && std::isfinite(inv_t)))
    throw std::invalid_argument("fastprobe._C: inv_temperature must be finite and > 0 in float32");
  return inv_t;
}

// The largest size, element count or element offset the bindings take: 2^62, so that the sums and
// products the kernels form from sizes and strides (K + 5 rows, a range's end past V, row * stride)
// stay inside int64 (hostile sizes, e.g. 2^40 x 2^40 elements, would otherwise wrap into small
// indices).
constexpr int64_t kMaxExtent = int64_t(1) << 62;

inline void check_size(int64_t value, int64_t min_value, const char* name) {
  if (value < min_value || value > kMaxExtent)
    throw std::invalid_argument(std::string("fastprobe._C: ") + name + " must be in [" +
                                std::to_string(min_value) + ", 2^62], got " + std::to_string(value));
}

// A tensor argument's sizes (each checked by check_size) and strides, in elements: every stride
// of a dimension the kernels step through (size > 1) is >= 0 (torch makes no negative strides), and
// the largest element offset, sum (size - 1) stride, is at most kMaxExtent. Without strides: a
// contiguous buffer of at most kMaxExtent elements. (That the buffer behind the pointer holds
// these elements, no binding can check: the caller's part.)
inline void check_layout(const char* name, std::initializer_list<int64_t> sizes,
                         std::initializer_list<int64_t> strides = {}) {
  auto fail = [name](const std::string& what) {
    throw std::invalid_argument(std::string("fastprobe._C: ") + name + " " + what);
  };
  const bool contiguous = strides.size() == 0;
  int64_t total = contiguous ? 1 : 0;  // the element count, or the largest offset
  const int64_t* stride = strides.begin();
  for (const int64_t size : sizes) {
    bool overflow = false;
    if (contiguous) {
      overflow = __builtin_mul_overflow(total, size, &total);
    } else if (const int64_t step = *stride++; size > 1) {  // (a size-1 dimension is never stepped)
      if (step < 0) fail("has a negative stride " + std::to_string(step) + " (strides must be >= 0)");
      int64_t span;  // (size - 1) stride
      overflow = __builtin_mul_overflow(size - 1, step, &span) || __builtin_add_overflow(total, span, &total);
    }
    if (overflow || total > kMaxExtent)
      fail(contiguous ? "has more than 2^62 elements" : "has an element offset beyond 2^62 (sizes times strides)");
  }
}

inline int64_t element_size(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

// The alignment a T* needs; a dtype-erased (void) pointer names its dtype's element size instead.
template <typename T> struct natural_alignment { static constexpr uintptr_t value = alignof(T); };
template <> struct natural_alignment<void> { static constexpr uintptr_t value = 1; };
template <> struct natural_alignment<const void> { static constexpr uintptr_t value = 1; };

// A data pointer from Python; null is an error where the caller needs the data, and so is an
// address not aligned to its elements (torch.frombuffer at an odd byte offset): reading there is
// undefined behaviour.
template <typename T>
inline T* pointer(uintptr_t address, bool required, const char* name,
                  uintptr_t alignment = natural_alignment<T>::value) {
  if (required && address == 0)
    throw std::invalid_argument(std::string("fastprobe._C: ") + name + " pointer is null");
  if (address % alignment != 0)
    throw std::invalid_argument(std::string("fastprobe._C: ") + name + " is not aligned to its " +
                                std::to_string(alignment) + "-byte elements: pass a copy (.clone())");
  return reinterpret_cast<T*>(address);
}

}  // namespace fastprobe
