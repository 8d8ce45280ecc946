// PYATTN_HOST_DEVICE marks a function of the torch-free headers shared by the C++ CPU kernels and the CUDA kernels:
// host and device code under nvcc, a plain inline function elsewhere.
#pragma once

#if defined(__CUDACC__)
#define PYATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYATTN_HOST_DEVICE inline
#endif
