// kiln::causal_attention on the GPU: launches causal_attention.cu on torch's current stream. Built by
// torch.utils.cpp_extension with nvcc, or hipified and built with hipcc on a ROCm build of torch (whose
// GPUs answer to the CUDA dispatch key too).
#include <cstring>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "causal_attention.cu"
#include "torch_op.h"

namespace {

at::Tensor causal_attention_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                 int64_t past_len, const std::optional<at::Tensor>& alibi_slopes,
                                 std::optional<double> scale, const std::optional<at::Tensor>& key_mask) {
    const kiln::AttentionShape s = kiln::check_attention_inputs(query, key, value, past_len, alibi_slopes, key_mask);
    TORCH_CHECK(s.head_dim <= KILN_MAX_HEAD_DIM, "kiln::causal_attention on the GPU supports head_dim up to ",
                KILN_MAX_HEAD_DIM, "; got ", s.head_dim);
    const c10::cuda::CUDAGuard guard(query.device());
    // The kernel has fp16 and fp32 variants; other dtypes run in fp32 and are cast back.
    const bool half = query.scalar_type() == at::kHalf;
    const auto compute_type = half ? at::kHalf : at::kFloat;
    const at::Tensor q = query.to(compute_type).contiguous();
    const at::Tensor k = key.to(compute_type).contiguous();
    const at::Tensor v = value.to(compute_type).contiguous();
    const at::Tensor slopes = alibi_slopes.has_value() ? alibi_slopes->to(at::kFloat).contiguous() : at::Tensor();
    const at::Tensor mask = key_mask.has_value() ? key_mask->to(at::kInt).contiguous() : at::Tensor();
    at::Tensor out = at::empty(query.sizes(), q.options());
    if (out.numel() == 0) return out.to(query.scalar_type());

    const dim3 grid(static_cast<unsigned>(s.batch * s.heads),
                    static_cast<unsigned>((s.q_len + KILN_ROWS_PER_BLOCK - 1) / KILN_ROWS_PER_BLOCK));
    const dim3 block(KILN_WARP_SIZE, KILN_ROWS_PER_BLOCK);
    const size_t shared = KILN_SHARED_FLOATS(s.head_dim) * sizeof(float);
    const float scale_value = static_cast<float>(scale.value_or(0.0));
    int scale_bits;
    std::memcpy(&scale_bits, &scale_value, sizeof scale_bits);
    const float* slope_ptr = slopes.defined() ? slopes.const_data_ptr<float>() : nullptr;
    const int* mask_ptr = mask.defined() ? mask.const_data_ptr<int>() : nullptr;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int ints[] = {static_cast<int>(s.heads), static_cast<int>(s.kv_heads), static_cast<int>(s.q_len),
                        static_cast<int>(s.kv_capacity), static_cast<int>(s.past_len), static_cast<int>(s.head_dim)};
    if (half) {
        const auto* q_ptr = reinterpret_cast<const kiln_half*>(q.const_data_ptr<at::Half>());
        const auto* k_ptr = reinterpret_cast<const kiln_half*>(k.const_data_ptr<at::Half>());
        const auto* v_ptr = reinterpret_cast<const kiln_half*>(v.const_data_ptr<at::Half>());
        auto* out_ptr = reinterpret_cast<kiln_half*>(out.mutable_data_ptr<at::Half>());
        kiln_causal_attention_f16<<<grid, block, shared, stream>>>(q_ptr, k_ptr, v_ptr, mask_ptr, slope_ptr, ints[0],
                                                                   ints[1], ints[2], ints[3], ints[4], ints[5],
                                                                   scale_bits, out_ptr);
    } else {
        kiln_causal_attention_f32<<<grid, block, shared, stream>>>(
            q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(), mask_ptr, slope_ptr,
            ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], scale_bits, out.mutable_data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out.to(query.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(kiln, CUDA, m) { m.impl("causal_attention", &causal_attention_cuda); }
