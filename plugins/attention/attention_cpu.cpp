// The CPU reference as a plain shared library (no torch): ONNX Runtime custom ops and ctypes callers
// load it where the PyTorch stack is absent. Returns 0 on success, 1 on inconsistent sizes.
#include "attention_cpu.h"

extern "C" int kiln_causal_attention_cpu_f32(const float* query, const float* key, const float* value,
                                             const int32_t* key_mask, const float* alibi_slopes, int64_t batch,
                                             int64_t heads, int64_t kv_heads, int64_t q_len, int64_t kv_capacity,
                                             int64_t past_len, int64_t head_dim, float scale, float* out) {
    if (kv_heads <= 0 || heads % kv_heads != 0 || past_len < 0 || past_len + q_len > kv_capacity) return 1;
    const kiln::AttentionShape shape{batch, heads, kv_heads, q_len, kv_capacity, past_len, head_dim};
    kiln::causal_attention_cpu<float>(query, key, value, key_mask, alibi_slopes, shape, scale, out, 0, batch * heads);
    return 0;
}
