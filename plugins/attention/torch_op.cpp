// kiln::causal_attention as a PyTorch op: the CPU kernel is the C++ reference in attention_cpu.h; the
// GPU kernel (causal_attention.cu) is registered by torch_op_cuda.cu when that file is built too.
// The fake (meta) implementation lives in plugins/torch_op.py, next to the code that loads this file.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "torch_op.h"

namespace {

at::Tensor causal_attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                int64_t past_len, const std::optional<at::Tensor>& alibi_slopes,
                                std::optional<double> scale, const std::optional<at::Tensor>& key_mask) {
    const kiln::AttentionShape shape = kiln::check_attention_inputs(query, key, value, past_len, alibi_slopes, key_mask);
    const at::Tensor slopes = alibi_slopes.has_value() ? alibi_slopes->to(at::kFloat).contiguous() : at::Tensor();
    const at::Tensor mask = key_mask.has_value() ? key_mask->to(at::kInt).contiguous() : at::Tensor();
    // Half and bfloat16 are computed in float; float64 keeps its precision (opcheck and gradcheck use it).
    const auto compute_type = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor q = query.to(compute_type).contiguous();
    const at::Tensor k = key.to(compute_type).contiguous();
    const at::Tensor v = value.to(compute_type).contiguous();
    at::Tensor out = at::empty(query.sizes(), q.options());
    const float* slope_ptr = slopes.defined() ? slopes.const_data_ptr<float>() : nullptr;
    const int32_t* mask_ptr = mask.defined() ? mask.const_data_ptr<int32_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES(compute_type, "kiln::causal_attention", [&] {
        at::parallel_for(0, shape.batch * shape.heads, 1, [&](int64_t begin, int64_t end) {
            kiln::causal_attention_cpu<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                                 v.const_data_ptr<scalar_t>(), mask_ptr, slope_ptr, shape,
                                                 scale.value_or(0.0), out.mutable_data_ptr<scalar_t>(), begin, end);
        });
    });
    return out.to(query.scalar_type());
}

}  // namespace

TORCH_LIBRARY(kiln, m) {
    m.def("causal_attention(Tensor query, Tensor key, Tensor value, SymInt past_len, Tensor? alibi_slopes=None, "
          "float? scale=None, Tensor? key_mask=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("causal_attention", &causal_attention_cpu); }
