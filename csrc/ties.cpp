// Fused TIES merge kernel (Yadav et al. 2023) for one logical tensor, behind a plain C ABI so
// that Python can load it with ctypes over tensor data pointers: no torch headers, the build
// needs only CMake and a C++ compiler (OpenMP optional).
//
// Why it exists: the PyTorch kernel (megatron_cpt/merge/methods.py) makes a separate pass over
// memory for every operation (delta, key, histogram, mask, weight, sum, sign, mask, sum, divide,
// add, cast), which put TIES at ~17x the I/O floor. Here:
//   pass 1  per fine-tune: delta -> magnitude key -> per-chunk histogram (fp32 needs a second
//           histogram of the low 16 bits inside the selected high bucket);
//   pass 2  all fine-tunes at once: trim, weight, sign election, disjoint mean, lambda, add to
//           the base, cast to the output dtype, one write.
//
// The result is bit-identical to the PyTorch kernel, by construction: every operation rounds
// exactly where PyTorch's CPU kernels round (16-bit tensors compute in float32 and round after
// each op; reductions over the model axis are sequential float32 sums starting at +0, rounded
// once), the threshold is the same radix select, and ties in magnitude at the threshold keep
// the lowest flat indices (the per-chunk counts of threshold-equal keys locate the flat index
// where the kept ones end, so the result does not depend on the thread count). Build with
// -ffp-contract=off: a fused multiply-add would skip a rounding PyTorch makes.
//
// Speed: pass 2 works in blocks of kBlock elements, one branch-free loop per step and model,
// which the compiler vectorizes: SSE2 in this generic build, AVX2 in ties_avx2.cpp (the same
// source compiled with -mavx2; IEEE operations give the same bits at any vector width).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int kBins = 1 << 15;     // 15-bit magnitude keys (16-bit dtypes) or the high 15 bits
constexpr int kLowBins = 1 << 16;  // fp32: the low 16 bits within the selected high bucket
constexpr int64_t kMinChunk = 1 << 20;
constexpr int64_t kMaxChunks = 64;  // bounds the per-chunk histograms' memory
constexpr int kMaxModels = 8;
constexpr int kBlock = 512;  // elements per block: every inner loop is branch-free and vectorizes

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Each dtype: load (to float32), store (round to nearest even, as c10 does), round (store then
// load) and the magnitude key (the bits of |x|, which order like |x|; always below 2^31).
struct F32 {
  using T = float;
  static constexpr bool kWide = true;
  static float load(T x) { return x; }
  static T store(float f) { return f; }
  static float round(float f) { return f; }
  static int32_t key(T x) { return static_cast<int32_t>(to_bits(x) & 0x7FFFFFFFu); }
};

// c10::BFloat16's round_to_nearest_even (NaN -> 0x7FC0), written without branches.
struct BF16 {
  using T = uint16_t;
  static constexpr bool kWide = false;
  static float load(T x) { return from_bits(static_cast<uint32_t>(x) << 16); }
  static T store(float f) {
    const uint32_t u = to_bits(f);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    return static_cast<T>(f != f ? 0x7FC0u : rounded);
  }
  static float round(float f) { return load(store(f)); }
  static int32_t key(T x) { return x & 0x7FFF; }
};

#ifdef __FLT16_MAX__
struct F16 {
  using T = uint16_t;
  static constexpr bool kWide = false;
  static float load(T x) {
    _Float16 h;
    std::memcpy(&h, &x, 2);
    return static_cast<float>(h);
  }
  static T store(float f) {
    _Float16 h = static_cast<_Float16>(f);
    T x;
    std::memcpy(&x, &h, 2);
    return x;
  }
  static float round(float f) { return static_cast<float>(static_cast<_Float16>(f)); }
  static int32_t key(T x) { return x & 0x7FFF; }
};
#endif

// How one fine-tune is trimmed: keep all (density >= 1), none (density <= 0), or its k largest:
// every key above the threshold, and the threshold-equal keys at flat indices below ``cut``
// (there are exactly ``k - above`` of those: the lowest-index ones, as the PyTorch kernel keeps).
struct Trim {
  int64_t k;  // -1: keep all; 0: keep none
  int32_t threshold = 0;
  int64_t cut = 0;
};

struct Span {
  int64_t begin, end;
};

inline Span chunk_span(int64_t c, int64_t chunk, int64_t n) {
  return {c * chunk, (c + 1) * chunk < n ? (c + 1) * chunk : n};
}

// The magnitude keys of x - base over [begin, begin + len), len <= kBlock.
template <typename D>
inline void delta_keys(const typename D::T* __restrict base, const typename D::T* __restrict x,
                       int64_t begin, int len, int32_t* __restrict keys) {
  for (int p = 0; p < len; ++p)
    keys[p] = D::key(D::store(D::load(x[begin + p]) - D::load(base[begin + p])));
}

// The bin holding the k-th largest element, and how many elements lie above that bin.
void select_bin(const int64_t* counts, int bins, int64_t k, int32_t* bin, int64_t* above) {
  int64_t cum = 0;
  for (int b = bins - 1; b >= 0; --b) {
    if (cum + counts[b] >= k) {
      *bin = b;
      *above = cum;
      return;
    }
    cum += counts[b];
  }
  *bin = 0;
  *above = cum;
}

// Per-chunk histograms of (key >> shift) over the keys whose (key >> 16) == only (if only >= 0),
// masked by mask; summed into total. hist holds chunks x bins counts, total bins.
template <typename D>
void histogram(const typename D::T* base, const typename D::T* x, int64_t n, int64_t chunk,
               int64_t chunks, int shift, int32_t mask, int32_t only, int bins, uint32_t* hist,
               int64_t* total, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    uint32_t* h = hist + c * bins;
    std::memset(h, 0, sizeof(uint32_t) * bins);
    int32_t keys[kBlock];
    const Span s = chunk_span(c, chunk, n);
    for (int64_t begin = s.begin; begin < s.end; begin += kBlock) {
      const int len = static_cast<int>(s.end - begin < kBlock ? s.end - begin : kBlock);
      delta_keys<D>(base, x, begin, len, keys);
      if (only < 0) {
        for (int p = 0; p < len; ++p) ++h[(keys[p] >> shift) & mask];
      } else {
        for (int p = 0; p < len; ++p)
          if ((keys[p] >> 16) == only) ++h[keys[p] & mask];
      }
    }
  }
  std::memset(total, 0, sizeof(int64_t) * bins);
  for (int64_t c = 0; c < chunks; ++c)
    for (int b = 0; b < bins; ++b) total[b] += hist[c * bins + b];
}

// hist: chunks x kLowBins counts (kBins for 16-bit dtypes); total: kLowBins. No std containers
// here: this file is also compiled with -mavx2, and a weak template instantiation shared with
// the generic build could hand AVX2 code to a CPU without it.
template <typename D>
void threshold(const typename D::T* base, const typename D::T* x, int64_t n, int64_t chunk,
               int64_t chunks, Trim& trim, uint32_t* hist, int64_t* total, int threads) {
  histogram<D>(base, x, n, chunk, chunks, D::kWide ? 16 : 0, kBins - 1, -1, kBins, hist, total,
               threads);
  int32_t bin;
  int64_t above;
  select_bin(total, kBins, trim.k, &bin, &above);
  int bins = kBins;
  if (D::kWide) {  // the low 16 bits, among the keys of the selected high bucket
    const int32_t high = bin;
    histogram<D>(base, x, n, chunk, chunks, 0, 0xFFFF, high, kLowBins, hist, total, threads);
    int64_t above_low;
    select_bin(total, kLowBins, trim.k - above, &bin, &above_low);
    above += above_low;
    bin |= high << 16;
    bins = kLowBins;
  }
  trim.threshold = bin;
  // The threshold-equal keys to keep: the first `missing` in flat order. Find the chunk that
  // holds the last of them from the per-chunk counts, then its flat index by one scan.
  int64_t missing = trim.k - above, c = 0;
  const int32_t slot = D::kWide ? (bin & 0xFFFF) : bin;
  for (; c < chunks && missing > hist[c * bins + slot]; ++c) missing -= hist[c * bins + slot];
  const Span s = chunk_span(c, chunk, n);
  int32_t keys[kBlock];
  for (int64_t begin = s.begin; begin < s.end; begin += kBlock) {
    const int len = static_cast<int>(s.end - begin < kBlock ? s.end - begin : kBlock);
    delta_keys<D>(base, x, begin, len, keys);
    for (int p = 0; p < len; ++p) {
      if (keys[p] == bin && --missing == 0) {
        trim.cut = begin + p + 1;
        return;
      }
    }
  }
  trim.cut = n;  // not reached: the counts guarantee `missing` equal keys
}

template <typename D>
int ties(const void* base_v, const void* const* inputs_v, int models, int64_t n,
         const int64_t* ks, const float* weights, int normalize, float lambda, int apply_lambda,
         void* out_v, int threads) {
  using T = typename D::T;
  if (models < 1 || models > kMaxModels || n < 1) return 1;
  const T* __restrict base = static_cast<const T*>(base_v);
  T* __restrict out = static_cast<T*>(out_v);
  const T* x[kMaxModels];
  for (int i = 0; i < models; ++i) x[i] = static_cast<const T*>(inputs_v[i]);
  if (threads < 1) threads = 1;
  int64_t chunk = (n + kMaxChunks - 1) / kMaxChunks;
  if (chunk < kMinChunk) chunk = kMinChunk;
  const int64_t chunks = (n + chunk - 1) / chunk;

  Trim trims[kMaxModels];
  uint32_t* hist = nullptr;
  int64_t* total = nullptr;
  for (int i = 0; i < models; ++i) {
    trims[i].k = ks[i] >= n ? -1 : ks[i];  // k == n keeps everything, as the radix select would
    if (trims[i].k > 0) {
      if (hist == nullptr) {
        const int bins = D::kWide ? kLowBins : kBins;
        hist = static_cast<uint32_t*>(std::malloc(sizeof(uint32_t) * bins * chunks));
        total = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * bins));
        if (hist == nullptr || total == nullptr) {
          std::free(hist);
          std::free(total);
          return 3;
        }
      }
      threshold<D>(base, x[i], n, chunk, chunks, trims[i], hist, total, threads);
    }
  }
  std::free(hist);
  std::free(total);

#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    float wd[kMaxModels][kBlock];
    float b[kBlock], sum[kBlock], elected[kBlock], mixed[kBlock], divisor[kBlock];
    const Span s = chunk_span(c, chunk, n);
    for (int64_t begin = s.begin; begin < s.end; begin += kBlock) {
      const int len = static_cast<int>(s.end - begin < kBlock ? s.end - begin : kBlock);
      for (int p = 0; p < len; ++p) {
        b[p] = D::load(base[begin + p]);
        sum[p] = 0.0f;
      }
      for (int i = 0; i < models; ++i) {
        const T* __restrict xi = x[i] + begin;
        const float w = weights[i];
        float* __restrict wdi = wd[i];
        const Trim t = trims[i];
        if (t.k < 0) {
          for (int p = 0; p < len; ++p) wdi[p] = D::round(D::round(D::load(xi[p]) - b[p]) * w);
        } else if (t.k == 0) {
          for (int p = 0; p < len; ++p) wdi[p] = D::round(0.0f * w);
        } else {
          // threshold-equal keys are kept at block positions below `cut` (int32: vectorizes)
          const int64_t rel = t.cut - begin;
          const int32_t cut = static_cast<int32_t>(rel < 0 ? 0 : (rel > len ? len : rel));
          for (int p = 0; p < len; ++p) {
            const T d = D::store(D::load(xi[p]) - b[p]);
            const int32_t key = D::key(d);
            const bool keep = (key > t.threshold) | ((key == t.threshold) & (p < cut));
            wdi[p] = D::round((keep ? D::load(d) : 0.0f) * w);  // masked_fill, mul_(weight)
          }
        }
        for (int p = 0; p < len; ++p) sum[p] += wdi[p];  // deltas.sum(0), in model order
      }
      for (int p = 0; p < len; ++p) {
        elected[p] = D::round(sum[p]) >= 0.0f ? 1.0f : -1.0f;
        mixed[p] = 0.0f;
        divisor[p] = 0.0f;
      }
      for (int i = 0; i < models; ++i) {
        const float w = weights[i];
        const float* __restrict wdi = wd[i];
        for (int p = 0; p < len; ++p) {
          // sign(wd) == elected: elected is +-1, so the product is exact; 0 and NaN disagree
          const float a = static_cast<float>(wdi[p] * elected[p] > 0.0f);
          mixed[p] += wdi[p] * a;  // (deltas * agree).sum(0): NaN * 0 stays NaN, as in PyTorch
          divisor[p] += D::round(w * a);
        }
      }
      for (int p = 0; p < len; ++p) {
        float m = D::round(mixed[p]);
        float dv = D::round(divisor[p]);
        dv = dv == 0.0f ? 1.0f : dv;
        m = normalize ? D::round(m / dv) : m;
        m = apply_lambda ? D::round(m * lambda) : m;
        out[begin + p] = D::store(b[p] + m);
      }
    }
  }
  return 0;
}

}  // namespace

// The kernel entry for this compilation: ties.cpp builds the generic one; ties_avx2.cpp
// includes this file again with MCPT_TIES_ENTRY renamed and -mavx2 (dispatch.cpp chooses).
#ifndef MCPT_TIES_ENTRY
#define MCPT_TIES_ENTRY mcpt_ties_generic
#endif

extern "C" int MCPT_TIES_ENTRY(int dtype, const void* base, const void* const* inputs, int models,
                               int64_t n, const int64_t* ks, const float* weights, int normalize,
                               float lambda, int apply_lambda, void* out, int threads) {
  switch (dtype) {
    case 0:
      return ties<F32>(base, inputs, models, n, ks, weights, normalize, lambda, apply_lambda,
                       out, threads);
    case 1:
      return ties<BF16>(base, inputs, models, n, ks, weights, normalize, lambda, apply_lambda,
                        out, threads);
#ifdef __FLT16_MAX__
    case 2:
      return ties<F16>(base, inputs, models, n, ks, weights, normalize, lambda, apply_lambda,
                       out, threads);
#endif
      default:
      return 2;
  }
}
