// One kernel source for nvcc and hipcc: the few names that differ between CUDA and HIP.
#pragma once

#if defined(__HIPCC__)
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
// AMD wavefronts are 64 lanes on CDNA (gfx90a, gfx942) and 32 on RDNA; clang tells the device pass.
#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define KILN_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#else
#define KILN_WARP_SIZE 64
#endif
// ROCm 5.x has no *_sync shuffles (torch's hipify leaves __shfl_xor_sync as is); wavefronts run in lockstep.
#define KILN_SHFL_XOR(value, lane_mask) __shfl_xor((value), (lane_mask))
#define KILN_SHFL(value, src_lane) __shfl((value), (src_lane))
#else
#include <cuda_fp16.h>
#define KILN_WARP_SIZE 32
#define KILN_SHFL_XOR(value, lane_mask) __shfl_xor_sync(0xffffffffu, (value), (lane_mask))
#define KILN_SHFL(value, src_lane) __shfl_sync(0xffffffffu, (value), (src_lane))
#endif

typedef __half kiln_half;

__device__ __forceinline__ float kiln_to_float(float x) { return x; }
__device__ __forceinline__ float kiln_to_float(kiln_half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T kiln_from_float(float x);
template <> __device__ __forceinline__ float kiln_from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ kiln_half kiln_from_float<kiln_half>(float x) { return __float2half(x); }

// Sum and max over the lanes of one warp; every lane gets the result.
__device__ __forceinline__ float kiln_warp_sum(float x) {
    for (int offset = KILN_WARP_SIZE / 2; offset > 0; offset /= 2) x += KILN_SHFL_XOR(x, offset);
    return x;
}
__device__ __forceinline__ float kiln_warp_max(float x) {
    for (int offset = KILN_WARP_SIZE / 2; offset > 0; offset /= 2) x = fmaxf(x, KILN_SHFL_XOR(x, offset));
    return x;
}
