// Native CUDA InfoNCE kernels: plain C++ launchers over raw pointers (no pybind11, no libtorch),
// bound to Python in info_nce_bindings.cpp. See info_nce.cu for the maths and the tiling.
#pragma once

#include <cstdint>

namespace fastcl {
namespace cuda {

// Element type of query / key / hard negatives (everything else is fp32 or int64).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One direction: anchor rows (queries) against shared candidates (keys) and private hard
// negatives. Pointers are device addresses; 0 means absent.
struct InfoNCEProblem {
  std::uintptr_t query = 0;         // (batch, dim), rows ld_query apart, unit stride
  std::uintptr_t key = 0;           // (num_keys, dim), rows ld_key apart
  std::uintptr_t hard = 0;          // (batch, num_hard, dim): row stride, slot stride, unit stride
  std::int64_t ld_query = 0, ld_key = 0, hard_row_stride = 0, hard_slot_stride = 0;
  std::int64_t batch = 0, num_keys = 0, num_hard = 0, dim = 0;
  std::uintptr_t positive = 0;      // (batch,) int64 index into key
  float inv_temperature = 1.0f;
  bool exclude_self = false;        // drop logit (i, i)
  // Symmetric loss: the key->query direction over keys 0..column_anchors-1 rides along.
  std::int64_t column_anchors = 0;
  DType dtype = DType::kFloat32;
  std::uintptr_t stream = 0;        // cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream)
};

// row_stats (batch, 2) fp32 <- [log-sum-exp over candidates, positive score].
// With column_anchors > 0: column_sums (column_anchors,) fp32 += sum_i exp(s_ij - column_shift[j]).
void info_nce_forward(const InfoNCEProblem& problem, std::uintptr_t row_stats, std::uintptr_t column_shift,
                      std::uintptr_t column_sums);

// Gradients wrt the similarities g_ij = w_i (softmax_ij - [j = pos(i)]) (+ the column
// direction's w'_j (colsoftmax_ij - [i = j])), then, all fp32 and accumulated:
// d_query (batch, dim) += g K / tau, d_key (num_keys, dim) += g^T Q / tau (atomics),
// d_hard (batch, num_hard, dim) = g_h q / tau, dtemp (batch,) = sum_j g_ij s_ij.
void info_nce_backward(const InfoNCEProblem& problem, std::uintptr_t row_stats, std::uintptr_t row_weight,
                       std::uintptr_t column_lse, std::uintptr_t column_weight, std::uintptr_t d_query,
                       std::uintptr_t d_key, std::uintptr_t d_hard, std::uintptr_t dtemp);

}  // namespace cuda
}  // namespace fastcl
