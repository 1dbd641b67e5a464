// Input checks of kiln::causal_attention shared by its CPU (torch_op.cpp) and GPU (torch_op_cuda.cu) kernels.
#pragma once

#include <ATen/ATen.h>

#include "attention_cpu.h"

namespace kiln {

// Checks the contract of causal_attention.cu and returns its sizes; errors name the offending tensor.
inline AttentionShape check_attention_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                             int64_t past_len, const std::optional<at::Tensor>& alibi_slopes,
                                             const std::optional<at::Tensor>& key_mask) {
    TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
                "kiln::causal_attention expects query, key, value as [batch, heads, seq, head_dim]; got ",
                query.sizes(), ", ", key.sizes(), ", ", value.sizes());
    TORCH_CHECK(key.sizes() == value.sizes(), "key ", key.sizes(), " and value ", value.sizes(), " differ");
    TORCH_CHECK(query.scalar_type() == key.scalar_type() && query.scalar_type() == value.scalar_type(),
                "query, key and value must share a dtype");
    TORCH_CHECK(query.is_floating_point(), "kiln::causal_attention expects floating-point tensors");
    TORCH_CHECK(key.device() == query.device() && value.device() == query.device(),
                "query, key and value must be on one device");
    const int64_t batch = query.size(0), heads = query.size(1), q_len = query.size(2), head_dim = query.size(3);
    const int64_t kv_heads = key.size(1), kv_capacity = key.size(2);
    TORCH_CHECK(key.size(0) == batch && key.size(3) == head_dim, "key ", key.sizes(),
                " does not match query ", query.sizes(), " in batch or head_dim");
    TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads (", heads, ") must be a multiple of kv_heads (",
                kv_heads, ")");
    TORCH_CHECK(past_len >= 0 && past_len + q_len <= kv_capacity, "past_len (", past_len, ") + q_len (", q_len,
                ") must fit in the cache length ", kv_capacity);
    // The kernel reads the slopes and the mask through raw pointers: on another device they are an illegal access.
    if (alibi_slopes.has_value()) {
        TORCH_CHECK(alibi_slopes->dim() == 1 && alibi_slopes->size(0) == heads, "alibi_slopes must be [heads] = [",
                    heads, "]; got ", alibi_slopes->sizes());
        TORCH_CHECK(alibi_slopes->device() == query.device(), "alibi_slopes must be on the query's device (",
                    query.device(), "); got ", alibi_slopes->device());
    }
    if (key_mask.has_value()) {
        TORCH_CHECK(key_mask->dim() == 2 && key_mask->size(0) == batch && key_mask->size(1) == kv_capacity,
                    "key_mask must be [batch, kv_capacity] = [", batch, ", ", kv_capacity, "]; got ",
                    key_mask->sizes());
        TORCH_CHECK(!key_mask->is_floating_point(), "key_mask must hold integers or booleans (0 = hidden key)");
        TORCH_CHECK(key_mask->device() == query.device(), "key_mask must be on the query's device (", query.device(),
                    "); got ", key_mask->device());
    }
    return AttentionShape{batch, heads, kv_heads, q_len, kv_capacity, past_len, head_dim};
}

}  // namespace kiln
