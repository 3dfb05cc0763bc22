// The library's C ABI (megatron_cpt/merge/native.py loads it with ctypes): picks the TIES
// kernel variant for this CPU at run time, so one build is both portable and fast.
#include <cstdint>

extern "C" {
int mcpt_ties_generic(int, const void*, const void* const*, int, int64_t, const int64_t*,
                      const float*, int, float, int, void*, int);
#ifdef MCPT_HAVE_AVX2
int mcpt_ties_avx2(int, const void*, const void* const*, int, int64_t, const int64_t*,
                   const float*, int, float, int, void*, int);
#endif

// 1 when the AVX2 variant is built and this CPU has AVX2.
int mcpt_has_avx2() {
#ifdef MCPT_HAVE_AVX2
  return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
  return 0;
#endif
}

// dtype: 0 float32, 1 bfloat16, 2 float16. All buffers contiguous, n elements each.
// ks[i]: -1 keeps all of fine-tune i, 0 none, else its k largest magnitudes (k = max(1,
// int(density * n)), computed by the caller exactly as the PyTorch kernel does).
// weights[i]: the weight as rounded to the tensor dtype. Returns 0, or non-zero when the
// arguments are outside what this kernel handles (the caller then uses the PyTorch kernel).
int mcpt_ties(int dtype, const void* base, const void* const* inputs, int models, int64_t n,
              const int64_t* ks, const float* weights, int normalize, float lambda,
              int apply_lambda, void* out, int threads) {
#ifdef MCPT_HAVE_AVX2
  if (mcpt_has_avx2())
    return mcpt_ties_avx2(dtype, base, inputs, models, n, ks, weights, normalize, lambda,
                          apply_lambda, out, threads);
#endif
  return mcpt_ties_generic(dtype, base, inputs, models, n, ks, weights, normalize, lambda,
                           apply_lambda, out, threads);
}

// Lets the loader check that it found the library it expects.
int mcpt_abi_version() { return 2; }

int mcpt_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}
}
