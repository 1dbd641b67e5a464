// kiln::causal_attention as a PyTorch op: the CPU kernel is the C++ reference in attention_cpu.h.
// The fake (meta) implementation lives in plugins/torch_op.py, next to the code that loads this file.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_cpu.h"

namespace {

at::Tensor causal_attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                int64_t past_len, const std::optional<at::Tensor>& alibi_slopes,
                                std::optional<double> scale) {
    TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
                "kiln::causal_attention expects query, key, value as [batch, heads, seq, head_dim]; got ",
                query.sizes(), ", ", key.sizes(), ", ", value.sizes());
    TORCH_CHECK(key.sizes() == value.sizes(), "key ", key.sizes(), " and value ", value.sizes(), " differ");
    TORCH_CHECK(query.scalar_type() == key.scalar_type() && query.scalar_type() == value.scalar_type(),
                "query, key and value must share a dtype");
    TORCH_CHECK(query.is_floating_point(), "kiln::causal_attention expects floating-point tensors");
    const int64_t batch = query.size(0), heads = query.size(1), q_len = query.size(2), head_dim = query.size(3);
    const int64_t kv_heads = key.size(1), kv_capacity = key.size(2);
    TORCH_CHECK(key.size(0) == batch && key.size(3) == head_dim, "key ", key.sizes(),
                " does not match query ", query.sizes(), " in batch or head_dim");
    TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads (", heads, ") must be a multiple of kv_heads (",
                kv_heads, ")");
    TORCH_CHECK(past_len >= 0 && past_len + q_len <= kv_capacity, "past_len (", past_len, ") + q_len (", q_len,
                ") must fit in the cache length ", kv_capacity);
    at::Tensor slopes;
    if (alibi_slopes.has_value()) {
        TORCH_CHECK(alibi_slopes->dim() == 1 && alibi_slopes->size(0) == heads, "alibi_slopes must be [heads] = [",
                    heads, "]; got ", alibi_slopes->sizes());
        slopes = alibi_slopes->to(at::kFloat).contiguous();
    }
    // Half and bfloat16 are computed in float; float64 keeps its precision (opcheck and gradcheck use it).
    const auto compute_type = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor q = query.to(compute_type).contiguous();
    const at::Tensor k = key.to(compute_type).contiguous();
    const at::Tensor v = value.to(compute_type).contiguous();
    at::Tensor out = at::empty(query.sizes(), q.options());
    const kiln::AttentionShape shape{batch, heads, kv_heads, q_len, kv_capacity, past_len, head_dim};
    const float* slope_ptr = slopes.defined() ? slopes.const_data_ptr<float>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES(compute_type, "kiln::causal_attention", [&] {
        at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
            kiln::causal_attention_cpu<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                                 v.const_data_ptr<scalar_t>(), slope_ptr, shape,
                                                 scale.value_or(0.0), out.mutable_data_ptr<scalar_t>(), begin, end);
        });
    });
    return out.to(query.scalar_type());
}

}  // namespace

TORCH_LIBRARY(kiln, m) {
    m.def("causal_attention(Tensor query, Tensor key, Tensor value, SymInt past_len, Tensor? alibi_slopes=None, "
          "float? scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("causal_attention", &causal_attention_cpu); }
