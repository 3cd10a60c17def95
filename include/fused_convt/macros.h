// Portability macros shared by the CPU path, the CUDA kernels and the tests.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FCT_HD __host__ __device__ __forceinline__
#else
#define FCT_HD inline
#endif
