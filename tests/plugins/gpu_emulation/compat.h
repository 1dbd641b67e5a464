// Test-only stand-in for plugins/attention/compat.h: runs the kernel source on the CPU, one std::thread
// per GPU thread, so that its arithmetic, masking and indexing are checked where no GPU exists.
// Blocks run one after another; a warp is 32 threads that meet at a std::barrier for each shuffle.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>

#define __global__
#define __device__ inline
#define __forceinline__
#define __shared__
#define __launch_bounds__(threads)
#define KILN_WARP_SIZE 32

struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim;
inline std::barrier<>* block_barrier;
inline std::barrier<>* warp_barriers[64];
inline float shuffle_slots[64][KILN_WARP_SIZE];

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

// Every lane of the warp publishes its value, then reads the one of `src_lane`.
inline float kiln_shfl(float value, int src_lane) {
    const unsigned warp = threadIdx.y, lane = threadIdx.x;
    shuffle_slots[warp][lane] = value;
    warp_barriers[warp]->arrive_and_wait();
    const float other = shuffle_slots[warp][src_lane];
    warp_barriers[warp]->arrive_and_wait();
    return other;
}
#define KILN_SHFL_XOR(value, lane_mask) kiln_shfl((value), int(threadIdx.x) ^ (lane_mask))
#define KILN_SHFL(value, src_lane) kiln_shfl((value), (src_lane))

inline float __int_as_float(int bits) { float f; std::memcpy(&f, &bits, sizeof f); return f; }
using std::fmaxf;
using std::min;

typedef _Float16 kiln_half;
inline float kiln_to_float(float x) { return x; }
inline float kiln_to_float(kiln_half x) { return static_cast<float>(x); }
template <typename T> inline T kiln_from_float(float x) { return static_cast<T>(x); }

inline float kiln_warp_sum(float x) {
    for (int offset = KILN_WARP_SIZE / 2; offset > 0; offset /= 2) x += KILN_SHFL_XOR(x, offset);
    return x;
}
inline float kiln_warp_max(float x) {
    for (int offset = KILN_WARP_SIZE / 2; offset > 0; offset /= 2) x = std::fmax(x, KILN_SHFL_XOR(x, offset));
    return x;
}
