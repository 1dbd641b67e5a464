// Launches the emulated kernel with the grid, block and shared memory that the launch contract asks for.
#include <thread>
#include <vector>

#include "causal_attention.cu"

float kiln_shared[KILN_SHARED_FLOATS(KILN_MAX_HEAD_DIM)];

template <typename T, typename Kernel>
static void launch(Kernel kernel, const T* q, const T* k, const T* v, const int* mask, const float* slopes, int batch, int heads,
                   int kv_heads, int q_len, int kv_capacity, int past_len, int head_dim, int scale_bits, T* out) {
    blockDim = {KILN_WARP_SIZE, KILN_ROWS_PER_BLOCK, 1};
    const int threads = KILN_WARP_SIZE * KILN_ROWS_PER_BLOCK;
    std::barrier<> block(threads);
    std::vector<std::barrier<>*> warps;
    for (int w = 0; w < KILN_ROWS_PER_BLOCK; ++w) warps.push_back(warp_barriers[w] = new std::barrier<>(KILN_WARP_SIZE));
    block_barrier = &block;
    for (unsigned gx = 0; gx < unsigned(batch * heads); ++gx) {
        for (unsigned gy = 0; gy < unsigned((q_len + KILN_ROWS_PER_BLOCK - 1) / KILN_ROWS_PER_BLOCK); ++gy) {
            blockIdx = {gx, gy, 1};
            std::vector<std::thread> pool;
            for (int t = 0; t < threads; ++t)
                pool.emplace_back([=] {
                    threadIdx = {unsigned(t % KILN_WARP_SIZE), unsigned(t / KILN_WARP_SIZE), 0};
                    kernel(q, k, v, mask, slopes, heads, kv_heads, q_len, kv_capacity, past_len, head_dim, scale_bits, out);
                });
            for (auto& thread : pool) thread.join();
        }
    }
    for (auto* w : warps) delete w;
}

extern "C" void emulate_f32(const float* q, const float* k, const float* v, const int* mask, const float* slopes,
                            int batch, int heads, int kv_heads, int q_len, int kv_capacity, int past_len, int head_dim,
                            int scale_bits, float* out) {
    launch<float>(kiln_causal_attention_f32, q, k, v, mask, slopes, batch, heads, kv_heads, q_len, kv_capacity,
                  past_len, head_dim, scale_bits, out);
}

extern "C" void emulate_f16(const kiln_half* q, const kiln_half* k, const kiln_half* v, const int* mask,
                            const float* slopes,
                            int batch, int heads, int kv_heads, int q_len, int kv_capacity, int past_len,
                            int head_dim, int scale_bits, kiln_half* out) {
    launch<kiln_half>(kiln_causal_attention_f16, q, k, v, mask, slopes, batch, heads, kv_heads, q_len, kv_capacity,
                      past_len, head_dim, scale_bits, out);
}
