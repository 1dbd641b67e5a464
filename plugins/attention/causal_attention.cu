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
//   dynamic shared memory kiln_shared_floats(head_dim, warp size) * sizeof(float).
//
// Work split: a block owns up to KILN_ROWS_PER_BLOCK query rows of one head and has as many warps. With
// fewer rows (decode: one), the spare warps split the keys of each row and their online-softmax states
// are merged at the end, so that a long cache is read by every warp of the block. A warp takes its keys a
// warp's width at a time: the lanes split head_dim for coalesced loads, then one transposing reduction
// (warp size - 1 shuffles) leaves lane c with the score of key c; probability * value is accumulated with
// the lanes splitting head_dim again. Keys and values are read straight from global memory (L1 and L2
// serve the rows of a block and the query heads of a KV group that read the same keys).
#include "compat.h"

#define KILN_ROWS_PER_BLOCK 8
#define KILN_MAX_HEAD_DIM 256

// Shared memory in floats: the block's scaled query rows, then each warp's partial accumulator and its
// (max, sum) pair for the merge of key splits.
#define KILN_SHARED_FLOATS(head_dim) (2 * KILN_ROWS_PER_BLOCK * (head_dim) + 2 * KILN_ROWS_PER_BLOCK)

// On entry partial[c] is this lane's share of sum c; on return lane c holds the whole of sum c. Each
// round halves the sums a lane keeps and swaps the other half with its partner: warp size - 1 shuffles.
// A template per round keeps every index a constant, so that `partial` stays in registers.
template <int OFFSET>
struct KilnTransposeSum {
    __device__ static __forceinline__ float run(float (&partial)[KILN_WARP_SIZE], int lane) {
        const bool upper = (lane & OFFSET) != 0;
#pragma unroll
        for (int i = 0; i < OFFSET; ++i) {
            const float send = upper ? partial[i] : partial[i + OFFSET];
            const float keep = upper ? partial[i + OFFSET] : partial[i];
            partial[i] = keep + KILN_SHFL_XOR(send, OFFSET);
        }
        return KilnTransposeSum<OFFSET / 2>::run(partial, lane);
    }
};
template <>
struct KilnTransposeSum<0> {
    __device__ static __forceinline__ float run(float (&partial)[KILN_WARP_SIZE], int) { return partial[0]; }
};

template <typename T>
__device__ void causal_attention(const T* __restrict__ query, const T* __restrict__ key,
                                 const T* __restrict__ value, const int* __restrict__ key_mask,
                                 const float* __restrict__ alibi_slopes, int heads, int kv_heads, int q_len,
                                 int kv_capacity, int past_len, int head_dim, int scale_bits,
                                 T* __restrict__ out) {
    extern __shared__ float kiln_shared[];
    float* q_rows = kiln_shared;                                        // [rows][head_dim]
    float* partial_acc = q_rows + KILN_ROWS_PER_BLOCK * head_dim;       // [warps][head_dim]
    float* partial_state = partial_acc + KILN_ROWS_PER_BLOCK * head_dim;  // [warps][2]: max, sum

    constexpr int PER_LANE = (KILN_MAX_HEAD_DIM + KILN_WARP_SIZE - 1) / KILN_WARP_SIZE;
    const int lane = threadIdx.x;
    const int warp = threadIdx.y;
    const int batch_head = blockIdx.x;
    const int head = batch_head % heads;
    const int batch = batch_head / heads;
    const int kv_head = head / (heads / kv_heads);
    const int first_row = blockIdx.y * KILN_ROWS_PER_BLOCK;
    const int rows = min(KILN_ROWS_PER_BLOCK, q_len - first_row);
    const int splits = KILN_ROWS_PER_BLOCK / rows;  // warps per row
    const int row = warp % rows;
    const int split = warp / rows;
    const bool working = split < splits;
    const int q_pos = past_len + first_row + row;
    const float scale = scale_bits == 0 ? 1.0f / sqrtf((float)head_dim) : __int_as_float(scale_bits);
    const float slope = alibi_slopes != nullptr ? alibi_slopes[head] : 0.0f;
    const size_t kv_offset = ((size_t)batch * kv_heads + kv_head) * kv_capacity * head_dim;
    const int* row_mask = key_mask != nullptr ? key_mask + (size_t)batch * kv_capacity : nullptr;

    // Scaling q once saves a multiply per key.
    const T* block_query = query + ((size_t)batch_head * q_len + first_row) * head_dim;
    for (int i = warp * KILN_WARP_SIZE + lane; i < rows * head_dim; i += KILN_ROWS_PER_BLOCK * KILN_WARP_SIZE)
        q_rows[i] = kiln_to_float(block_query[i]) * scale;
    __syncthreads();

    float running_max = -INFINITY, running_sum = 0.0f, q[PER_LANE], acc[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int d = lane + i * KILN_WARP_SIZE;
        q[i] = working && d < head_dim ? q_rows[row * head_dim + d] : 0.0f;
        acc[i] = 0.0f;
    }
    if (working) {
        const T* keys = key + kv_offset;
        const T* values = value + kv_offset;
        const int visible = q_pos + 1;
        for (int start = split * KILN_WARP_SIZE; start < visible; start += splits * KILN_WARP_SIZE) {
            const int chunk = min(KILN_WARP_SIZE, visible - start);
            float partial[KILN_WARP_SIZE];
#pragma unroll
            for (int c = 0; c < KILN_WARP_SIZE; ++c) {
                float sum = 0.0f;
                if (c < chunk) {
                    const T* key_row = keys + (size_t)(start + c) * head_dim;
#pragma unroll
                    for (int i = 0; i < PER_LANE; ++i) {
                        const int d = lane + i * KILN_WARP_SIZE;
                        if (d < head_dim) sum += q[i] * kiln_to_float(key_row[d]);
                    }
                }
                partial[c] = sum;
            }
            const float dot = KilnTransposeSum<KILN_WARP_SIZE / 2>::run(partial, lane);
            const int j = start + lane;
            float score = -INFINITY;
            if (j < visible && (row_mask == nullptr || row_mask[j] != 0))
                // ALiBi as slope * (key - query): the per-row constant BLOOM adds instead cancels in softmax.
                score = dot + slope * (float)(j - q_pos);
            const float chunk_max = kiln_warp_max(score);
            if (chunk_max == -INFINITY) continue;  // every key of this chunk hidden (uniform over the warp)
            const float new_max = fmaxf(running_max, chunk_max);
            const float correction = expf(running_max - new_max);  // 0 on the first chunk
            const float p = score == -INFINITY ? 0.0f : expf(score - new_max);
            running_sum = running_sum * correction + kiln_warp_sum(p);
            running_max = new_max;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) acc[i] *= correction;
            for (int c = 0; c < chunk; ++c) {
                const float p_c = KILN_SHFL(p, c);
                const T* value_row = values + (size_t)(start + c) * head_dim;
#pragma unroll
                for (int i = 0; i < PER_LANE; ++i) {
                    const int d = lane + i * KILN_WARP_SIZE;
                    if (d < head_dim) acc[i] += p_c * kiln_to_float(value_row[d]);
                }
            }
        }
    }

    T* out_row = out + ((size_t)batch_head * q_len + first_row + row) * head_dim;
    if (splits == 1) {
        if (!working) return;
        const float inv_sum = running_sum > 0.0f ? 1.0f / running_sum : 0.0f;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const int d = lane + i * KILN_WARP_SIZE;
            if (d < head_dim) out_row[d] = kiln_from_float<T>(acc[i] * inv_sum);
        }
        return;
    }
    // Merge the key splits of each row: rescale every split's sum and accumulator to the common max.
    if (working) {
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const int d = lane + i * KILN_WARP_SIZE;
            if (d < head_dim) partial_acc[warp * head_dim + d] = acc[i];
        }
        if (lane == 0) {
            partial_state[2 * warp] = running_max;
            partial_state[2 * warp + 1] = running_sum;
        }
    }
    __syncthreads();
    if (!working || split != 0) return;
    float merged_max = -INFINITY;
    for (int s = 0; s < splits; ++s) merged_max = fmaxf(merged_max, partial_state[2 * (row + s * rows)]);
    float merged_sum = 0.0f, weights[KILN_ROWS_PER_BLOCK];
    for (int s = 0; s < splits; ++s) {
        const int w = row + s * rows;
        weights[s] = partial_state[2 * w] == -INFINITY ? 0.0f : expf(partial_state[2 * w] - merged_max);
        merged_sum += partial_state[2 * w + 1] * weights[s];
    }
    const float inv_sum = merged_sum > 0.0f ? 1.0f / merged_sum : 0.0f;
    for (int d = lane; d < head_dim; d += KILN_WARP_SIZE) {
        float total = 0.0f;
        for (int s = 0; s < splits; ++s) total += partial_acc[(row + s * rows) * head_dim + d] * weights[s];
        out_row[d] = kiln_from_float<T>(total * inv_sum);
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
