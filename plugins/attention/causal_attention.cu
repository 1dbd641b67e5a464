// Causal attention of a block of new queries over a KV cache, one source for nvcc and hipcc.
//
// Contract (shared with the CPU reference in attention_cpu.h):
//   query [batch, heads, q_len, head_dim], key/value [batch, kv_heads, kv_capacity, head_dim],
//   out [batch, heads, q_len, head_dim], all contiguous; alibi_slopes [heads] float or null;
//   key_mask [batch, kv_capacity] int32 or null, 0 hiding a key (padding) from every query.
//   A query that sees no key at all (a left-padding row) gets zeros, as SDPA-based exports give.
//   Query i sits at position past_len + i and sees keys 0 .. past_len + i; the cache already holds
//   the new keys, and entries past past_len + q_len (a preallocated cache) are never read.
//   heads is a multiple of kv_heads (grouped-query attention); head_dim <= KILN_MAX_HEAD_DIM.
//   scale_bits is the IEEE-754 bit pattern of the softmax scale, 0 meaning 1/sqrt(head_dim):
//   TensorRT's AOT plugins pass extra kernel scalars as int32 only.
//   Kernel ABI is input pointers, then int scalars, then the output pointer (TensorRT's order).
//
// Launch: grid (batch * heads, ceil(q_len / KILN_ROWS_PER_BLOCK)), block (warp size, KILN_ROWS_PER_BLOCK),
//   dynamic shared memory 2 * KILN_TILE_KEYS * head_dim * sizeof(float). One warp owns one query row;
//   the block stages key/value tiles in shared memory for its rows and keeps an online softmax.
#include "compat.h"

#define KILN_ROWS_PER_BLOCK 4
#define KILN_TILE_KEYS 16
#define KILN_MAX_HEAD_DIM 256

template <typename T>
__device__ void causal_attention(const T* __restrict__ query, const T* __restrict__ key,
                                 const T* __restrict__ value, const int* __restrict__ key_mask,
                                 const float* __restrict__ alibi_slopes,
                                 int heads, int kv_heads, int q_len, int kv_capacity, int past_len,
                                 int head_dim, int scale_bits, T* __restrict__ out) {
    extern __shared__ float kiln_tiles[];
    float* tile_k = kiln_tiles;                           // [KILN_TILE_KEYS][head_dim]
    float* tile_v = kiln_tiles + KILN_TILE_KEYS * head_dim;

    constexpr int PER_LANE = KILN_MAX_HEAD_DIM / KILN_WARP_SIZE;
    const int lane = threadIdx.x;
    const int row = threadIdx.y;
    const int block_threads = blockDim.x * blockDim.y;
    const int thread = row * blockDim.x + lane;

    const int batch_head = blockIdx.x;
    const int head = batch_head % heads;
    const int batch = batch_head / heads;
    const int kv_head = head / (heads / kv_heads);
    const int first_row = blockIdx.y * KILN_ROWS_PER_BLOCK;
    const int q_index = first_row + row;
    const bool active = q_index < q_len;
    const int q_pos = past_len + q_index;
    const float scale = scale_bits == 0 ? 1.0f / sqrtf((float)head_dim) : __int_as_float(scale_bits);
    const float slope = alibi_slopes != nullptr ? alibi_slopes[head] : 0.0f;

    const size_t q_offset = ((size_t)batch_head * q_len + (active ? q_index : 0)) * head_dim;
    const size_t kv_offset = ((size_t)batch * kv_heads + kv_head) * kv_capacity * head_dim;
    const int* row_mask = key_mask != nullptr ? key_mask + (size_t)batch * kv_capacity : nullptr;

    // Scaling q once saves a multiply per key.
    float q[PER_LANE], acc[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int d = lane + i * KILN_WARP_SIZE;
        q[i] = (active && d < head_dim) ? kiln_to_float(query[q_offset + d]) * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float running_max = -INFINITY;
    float running_sum = 0.0f;

    // Every warp walks the same tiles so that __syncthreads stays uniform; the last row decides how many.
    const int last_row = min(first_row + KILN_ROWS_PER_BLOCK, q_len) - 1;
    const int keys_needed = past_len + last_row + 1;
    for (int tile_start = 0; tile_start < keys_needed; tile_start += KILN_TILE_KEYS) {
        const int tile_keys = min(KILN_TILE_KEYS, keys_needed - tile_start);
        __syncthreads();
        for (int i = thread; i < tile_keys * head_dim; i += block_threads) {
            const size_t src = kv_offset + (size_t)tile_start * head_dim + i;
            tile_k[i] = kiln_to_float(key[src]);
            tile_v[i] = kiln_to_float(value[src]);
        }
        __syncthreads();
        if (!active || tile_start > q_pos) continue;

        const int visible = min(tile_keys, q_pos - tile_start + 1);
        float scores[KILN_TILE_KEYS];
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < KILN_TILE_KEYS; ++j) {
            scores[j] = -INFINITY;
            if (j < visible && (row_mask == nullptr || row_mask[tile_start + j] != 0)) {
                float partial = 0.0f;
#pragma unroll
                for (int i = 0; i < PER_LANE; ++i) {
                    const int d = lane + i * KILN_WARP_SIZE;
                    if (d < head_dim) partial += q[i] * tile_k[j * head_dim + d];
                }
                // ALiBi as slope * (key - query): the per-row constant BLOOM adds instead cancels in softmax.
                scores[j] = kiln_warp_sum(partial) + slope * (float)(tile_start + j - q_pos);
                tile_max = fmaxf(tile_max, scores[j]);
            }
        }
        if (tile_max == -INFINITY) continue;  // every key of this tile masked: nothing to add
        const float new_max = fmaxf(running_max, tile_max);
        const float correction = expf(running_max - new_max);  // 0 on the first tile
        running_sum *= correction;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) acc[i] *= correction;
#pragma unroll
        for (int j = 0; j < KILN_TILE_KEYS; ++j) {
            if (scores[j] != -INFINITY) {
                const float p = expf(scores[j] - new_max);
                running_sum += p;
#pragma unroll
                for (int i = 0; i < PER_LANE; ++i) {
                    const int d = lane + i * KILN_WARP_SIZE;
                    if (d < head_dim) acc[i] += p * tile_v[j * head_dim + d];
                }
            }
        }
        running_max = new_max;
    }

    if (!active) return;
    const float inv_sum = running_sum > 0.0f ? 1.0f / running_sum : 0.0f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int d = lane + i * KILN_WARP_SIZE;
        if (d < head_dim) out[q_offset + d] = kiln_from_float<T>(acc[i] * inv_sum);
    }
}

#define KILN_ATTENTION_ENTRY(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(KILN_ROWS_PER_BLOCK * KILN_WARP_SIZE)                 \
    NAME(const T* query, const T* key, const T* value, const int* key_mask, const float* alibi_slopes,  \
         int heads, int kv_heads, int q_len, int kv_capacity, int past_len, int head_dim, int scale_bits, \
         T* out) {                                                                                       \
        causal_attention<T>(query, key, value, key_mask, alibi_slopes, heads, kv_heads, q_len,         \
                            kv_capacity, past_len, head_dim, scale_bits, out);                          \
    }

KILN_ATTENTION_ENTRY(kiln_causal_attention_f32, float)
KILN_ATTENTION_ENTRY(kiln_causal_attention_f16, kiln_half)
