// Online-softmax row update shared by the CUDA attention kernels and their CPU twin
// (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022, Alg. 1 lines 9-12).
//
// Logits are kept in log2 units: s = (scale * log2 e) * q.k, so every exponential is exp2.
// Per query row the kernel keeps the running max m and the running sum l of 2^(s - m):
//   m' = max(m, max_j s_j)
//   alpha = 2^(m - m')           (rescales l and the output accumulator; 0 when m = -inf)
//   p_j = 2^(s_j - m')
//   l' = alpha * l + sum_j p_j
//   O = acc / l                  (at the end)
#pragma once

#include <cmath>

#include "fastdiff/common.h"

namespace fastdiff {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;

FD_HD float neg_inf() { return -INFINITY; }

// New running max from the old one and the max of this tile's logits.
FD_HD float row_new_max(float m_old, float tile_max) { return fmaxf(m_old, tile_max); }

// The reference point used for exponentials: m' itself, or 0 when the whole row is -inf so far
// (avoids (-inf) - (-inf) = NaN; such probabilities are 2^-inf = 0 either way).
FD_HD float row_ref(float m_new) { return m_new == -INFINITY ? 0.0f : m_new; }

// Factor that rescales the old accumulators: 2^(m_old - m_ref); exactly 0 for m_old = -inf.
FD_HD float row_rescale(float m_old, float m_ref) { return exp2f(m_old - m_ref); }

// Unnormalised probability of one logit.
FD_HD float row_prob(float s, float m_ref) { return exp2f(s - m_ref); }

// Running sum after this tile.
FD_HD float row_sum(float l_old, float alpha, float tile_sum) { return fmaf(l_old, alpha, tile_sum); }

// Final normalisation factor 1 / l (l >= 1 for any row with a finite logit).
FD_HD float row_inv_sum(float l) { return 1.0f / l; }

}  // namespace attn
}  // namespace fastdiff
