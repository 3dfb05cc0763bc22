// The TIES kernel compiled for AVX2 (x86-64 only; CMakeLists.txt adds -mavx2 to this file
// alone). dispatch.cpp calls it only where the CPU reports AVX2, so the library still loads and
// runs on any x86-64 CPU. No -mfma: results stay bit-identical to the generic build.
#define MCPT_TIES_ENTRY mcpt_ties_avx2
#include "ties.cpp"
