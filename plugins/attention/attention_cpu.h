// CPU reference of the causal attention contract in causal_attention.cu, written for clarity.
// Accumulates in double so that it can stand as the reference the kernels are checked against.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace kiln {

struct AttentionShape {
    int64_t batch, heads, kv_heads, q_len, kv_capacity, past_len, head_dim;
};

// Computes rows [first_batch_head, last_batch_head) of batch * heads; scale <= 0 means 1/sqrt(head_dim).
// key_mask [batch, kv_capacity] (or null): 0 hides that key; a query that sees no key gets zeros.
template <typename T>
void causal_attention_cpu(const T* query, const T* key, const T* value, const int32_t* key_mask,
                          const float* alibi_slopes, const AttentionShape& s, double scale, T* out,
                          int64_t first_batch_head, int64_t last_batch_head) {
    if (scale <= 0.0) scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
    const int64_t group = s.heads / s.kv_heads;
    std::vector<double> scores(s.past_len + s.q_len);
    std::vector<double> acc(s.head_dim);
    for (int64_t bh = first_batch_head; bh < last_batch_head; ++bh) {
        const int64_t batch = bh / s.heads, head = bh % s.heads;
        const double slope = alibi_slopes != nullptr ? alibi_slopes[head] : 0.0;
        const T* k = key + (batch * s.kv_heads + head / group) * s.kv_capacity * s.head_dim;
        const T* v = value + (batch * s.kv_heads + head / group) * s.kv_capacity * s.head_dim;
        const int32_t* mask = key_mask != nullptr ? key_mask + batch * s.kv_capacity : nullptr;
        for (int64_t i = 0; i < s.q_len; ++i) {
            const T* q = query + (bh * s.q_len + i) * s.head_dim;
            const int64_t q_pos = s.past_len + i;
            double max_score = -INFINITY;
            for (int64_t j = 0; j <= q_pos; ++j) {
                if (mask != nullptr && mask[j] == 0) {
                    scores[j] = -INFINITY;
                    continue;
                }
                double dot = 0.0;
                for (int64_t d = 0; d < s.head_dim; ++d)
                    dot += static_cast<double>(q[d]) * static_cast<double>(k[j * s.head_dim + d]);
                scores[j] = dot * scale + slope * static_cast<double>(j - q_pos);
                max_score = std::max(max_score, scores[j]);
            }
            double sum = 0.0;
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t j = 0; j <= q_pos && max_score != -INFINITY; ++j) {
                if (scores[j] == -INFINITY) continue;
                const double p = std::exp(scores[j] - max_score);
                sum += p;
                for (int64_t d = 0; d < s.head_dim; ++d) acc[d] += p * static_cast<double>(v[j * s.head_dim + d]);
            }
            T* o = out + (bh * s.q_len + i) * s.head_dim;
            for (int64_t d = 0; d < s.head_dim; ++d) o[d] = static_cast<T>(sum > 0.0 ? acc[d] / sum : 0.0);
        }
    }
}

}  // namespace kiln
