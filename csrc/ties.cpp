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
// the lowest flat indices (per-chunk counts of threshold-equal keys give each chunk its rank
// offset, so the parallel result does not depend on the thread count). Build with
// -ffp-contract=off: a fused multiply-add would skip a rounding PyTorch makes.
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int kBins = 1 << 15;     // 15-bit magnitude keys (16-bit dtypes) or the high 15 bits
constexpr int kLowBins = 1 << 16;  // fp32: the low 16 bits within the selected high bucket
constexpr int64_t kMinChunk = 1 << 20;
constexpr int64_t kMaxChunks = 64;  // bounds the per-chunk histograms' memory
constexpr int kMaxModels = 64;

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

struct F32 {
  using T = float;
  static constexpr bool kWide = true;
  static float load(T x) { return x; }
  static T store(float f) { return f; }
  static float round(float f) { return f; }
  static uint32_t key(T x) { return to_bits(x) & 0x7FFFFFFFu; }
};

// c10::BFloat16's round-to-nearest-even (NaN -> 0x7FC0).
struct BF16 {
  using T = uint16_t;
  static constexpr bool kWide = false;
  static float load(T x) { return from_bits(static_cast<uint32_t>(x) << 16); }
  static T store(float f) {
    if (f != f) return 0x7FC0;
    uint32_t u = to_bits(f);
    return static_cast<T>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
  }
  static float round(float f) { return load(store(f)); }
  static uint32_t key(T x) { return x & 0x7FFFu; }
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
  static uint32_t key(T x) { return x & 0x7FFFu; }
};
#endif

// How one fine-tune is trimmed: keep all (density >= 1), none (density <= 0), or its k largest.
struct Trim {
  int64_t k;  // -1: keep all; 0: keep none
  uint32_t threshold = 0;
  int64_t missing = 0;        // threshold-equal entries kept (the lowest flat indices)
  std::vector<int64_t> seen;  // per chunk: threshold-equal entries in earlier chunks
};

// The bin holding the k-th largest element, and how many elements lie above that bin.
template <typename Count>
void select_bin(const Count* counts, int bins, int64_t k, uint32_t* bin, int64_t* above) {
  int64_t cum = 0;
  for (int b = bins - 1; b >= 0; --b) {
    if (cum + static_cast<int64_t>(counts[b]) >= k) {
      *bin = static_cast<uint32_t>(b);
      *above = cum;
      return;
    }
    cum += counts[b];
  }
  *bin = 0;
  *above = cum;
}

template <typename D>
void threshold(const typename D::T* base, const typename D::T* x, int64_t n, int64_t chunk,
               int64_t chunks, Trim& trim, std::vector<uint32_t>& hist, int threads) {
  using T = typename D::T;
  const int shift = D::kWide ? 16 : 0;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    uint32_t* h = hist.data() + c * kBins;
    std::memset(h, 0, sizeof(uint32_t) * kBins);
    const int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
    for (int64_t j = c * chunk; j < end; ++j) {
      T d = D::store(D::load(x[j]) - D::load(base[j]));
      ++h[D::key(d) >> shift];
    }
  }
  std::vector<int64_t> total(kBins, 0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int b = 0; b < kBins; ++b) total[b] += hist[c * kBins + b];
  uint32_t high;
  int64_t above;
  select_bin(total.data(), kBins, trim.k, &high, &above);
  trim.seen.assign(chunks, 0);
  if (!D::kWide) {
    trim.threshold = high;
    trim.missing = trim.k - above;
    for (int64_t c = 1; c < chunks; ++c)
      trim.seen[c] = trim.seen[c - 1] + hist[(c - 1) * kBins + high];
    return;
  }
  std::vector<uint32_t> low(static_cast<size_t>(chunks) * kLowBins);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    uint32_t* h = low.data() + c * kLowBins;
    std::memset(h, 0, sizeof(uint32_t) * kLowBins);
    const int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
    for (int64_t j = c * chunk; j < end; ++j) {
      uint32_t key = D::key(D::store(D::load(x[j]) - D::load(base[j])));
      if ((key >> 16) == high) ++h[key & 0xFFFFu];
    }
  }
  std::vector<int64_t> low_total(kLowBins, 0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int b = 0; b < kLowBins; ++b) low_total[b] += low[c * kLowBins + b];
  uint32_t lo;
  int64_t above_low;
  select_bin(low_total.data(), kLowBins, trim.k - above, &lo, &above_low);
  trim.threshold = (high << 16) | lo;
  trim.missing = trim.k - above - above_low;
  for (int64_t c = 1; c < chunks; ++c)
    trim.seen[c] = trim.seen[c - 1] + low[(c - 1) * kLowBins + lo];
}

template <typename D>
int ties(const void* base_v, const void* const* inputs_v, int models, int64_t n,
         const int64_t* ks, const float* weights, int normalize, float lambda, int apply_lambda,
         void* out_v, int threads) {
  using T = typename D::T;
  if (models < 1 || models > kMaxModels || n < 1) return 1;
  const T* base = static_cast<const T*>(base_v);
  T* out = static_cast<T*>(out_v);
  const T* x[kMaxModels];
  for (int i = 0; i < models; ++i) x[i] = static_cast<const T*>(inputs_v[i]);
  if (threads < 1) threads = 1;
  int64_t chunk = (n + kMaxChunks - 1) / kMaxChunks;
  if (chunk < kMinChunk) chunk = kMinChunk;
  const int64_t chunks = (n + chunk - 1) / chunk;

  std::vector<Trim> trims(models);
  std::vector<uint32_t> hist;
  for (int i = 0; i < models; ++i) {
    trims[i].k = ks[i];
    if (ks[i] > 0 && ks[i] < n) {
      if (hist.empty()) hist.resize(static_cast<size_t>(chunks) * kBins);
      threshold<D>(base, x[i], n, chunk, chunks, trims[i], hist, threads);
    } else if (ks[i] >= n) {
      trims[i].k = -1;  // k == n keeps everything, as the radix select would
    }
  }

#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t seen[kMaxModels];
    float wd[kMaxModels];
    for (int i = 0; i < models; ++i) seen[i] = trims[i].seen.empty() ? 0 : trims[i].seen[c];
    const int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
    for (int64_t j = c * chunk; j < end; ++j) {
      const float b = D::load(base[j]);
      float sum = 0.0f;
      for (int i = 0; i < models; ++i) {
        const T d = D::store(D::load(x[i][j]) - b);
        bool keep;
        const Trim& t = trims[i];
        if (t.k < 0) {
          keep = true;
        } else if (t.k == 0) {
          keep = false;
        } else {
          const uint32_t key = D::key(d);
          if (key > t.threshold) {
            keep = true;
          } else if (key == t.threshold) {
            keep = seen[i] < t.missing;
            ++seen[i];
          } else {
            keep = false;
          }
        }
        const float kept = keep ? D::load(d) : 0.0f;  // masked_fill(~keep, 0)
        wd[i] = D::round(kept * weights[i]);          // deltas.mul_(weight)
        sum += wd[i];
      }
      const float elected = D::round(sum) >= 0.0f ? 1.0f : -1.0f;
      float mixed = 0.0f, divisor = 0.0f;
      for (int i = 0; i < models; ++i) {
        const bool agree = (wd[i] > 0.0f && elected > 0.0f) || (wd[i] < 0.0f && elected < 0.0f);
        const float a = agree ? 1.0f : 0.0f;
        mixed += wd[i] * a;  // (deltas * agree).sum(0): NaN * 0 stays NaN, as in PyTorch
        divisor += D::round(weights[i] * a);
      }
      mixed = D::round(mixed);
      divisor = D::round(divisor);
      if (divisor == 0.0f) divisor = 1.0f;
      if (normalize) mixed = D::round(mixed / divisor);
      if (apply_lambda) mixed = D::round(mixed * lambda);
      out[j] = D::store(b + mixed);
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16, 2 float16. All buffers contiguous, n elements each.
// ks[i]: -1 keeps all of fine-tune i, 0 none, else its k largest magnitudes (k = max(1,
// int(density * n)), computed by the caller exactly as the PyTorch kernel does).
// weights[i]: the weight as rounded to the tensor dtype. Returns 0, or non-zero when the
// arguments are outside what this kernel handles (the caller then uses the PyTorch kernel).
int mcpt_ties(int dtype, const void* base, const void* const* inputs, int models, int64_t n,
              const int64_t* ks, const float* weights, int normalize, float lambda,
              int apply_lambda, void* out, int threads) {
  try {
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
  } catch (const std::bad_alloc&) {
    return 3;
  }
}

// Lets the loader check that it found the library it expects.
int mcpt_abi_version() { return 1; }

int mcpt_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}
}
