// C exports of the CUDA InfoNCE launchers (compiled only with FASTCL_CUDA), kept out of the .cu
// file so nvcc compiles kernels only.
#include "../registry.h"
#include "info_nce_cuda.h"

#include <stdexcept>

namespace fastcl {
namespace {

cuda::InfoNCEProblem make_problem(std::uintptr_t query, std::uintptr_t key, std::uintptr_t hard, int64_t ld_query,
                                  int64_t ld_key, int64_t hard_row_stride, int64_t hard_slot_stride, int64_t batch,
                                  int64_t num_keys, int64_t num_hard, int64_t dim, std::uintptr_t positive,
                                  double inv_temperature, bool exclude_self, int64_t column_anchors, int64_t dtype,
                                  std::uintptr_t stream) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  cuda::InfoNCEProblem p;
  p.query = query;
  p.key = key;
  p.hard = hard;
  p.ld_query = ld_query;
  p.ld_key = ld_key;
  p.hard_row_stride = hard_row_stride;
  p.hard_slot_stride = hard_slot_stride;
  p.batch = batch;
  p.num_keys = num_keys;
  p.num_hard = num_hard;
  p.dim = dim;
  p.positive = positive;
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.exclude_self = exclude_self;
  p.column_anchors = column_anchors;
  p.dtype = static_cast<cuda::DType>(dtype);
  p.stream = stream;
  return p;
}

void forward(std::uintptr_t query, std::uintptr_t key, std::uintptr_t hard, int64_t ld_query, int64_t ld_key,
             int64_t hard_row_stride, int64_t hard_slot_stride, int64_t batch, int64_t num_keys, int64_t num_hard,
             int64_t dim, std::uintptr_t positive, double inv_temperature, bool exclude_self, int64_t column_anchors,
             int64_t dtype, std::uintptr_t stream, std::uintptr_t row_stats, std::uintptr_t column_shift,
             std::uintptr_t column_sums) {
  cuda::info_nce_forward(make_problem(query, key, hard, ld_query, ld_key, hard_row_stride, hard_slot_stride, batch,
                                      num_keys, num_hard, dim, positive, inv_temperature, exclude_self, column_anchors,
                                      dtype, stream),
                         row_stats, column_shift, column_sums);
}

void backward(std::uintptr_t query, std::uintptr_t key, std::uintptr_t hard, int64_t ld_query, int64_t ld_key,
              int64_t hard_row_stride, int64_t hard_slot_stride, int64_t batch, int64_t num_keys, int64_t num_hard,
              int64_t dim, std::uintptr_t positive, double inv_temperature, bool exclude_self, int64_t column_anchors,
              int64_t dtype, std::uintptr_t stream, std::uintptr_t row_stats, std::uintptr_t row_weight,
              std::uintptr_t column_lse, std::uintptr_t column_weight, std::uintptr_t d_query, std::uintptr_t d_key,
              std::uintptr_t d_hard, std::uintptr_t dtemp) {
  cuda::info_nce_backward(make_problem(query, key, hard, ld_query, ld_key, hard_row_stride, hard_slot_stride, batch,
                                       num_keys, num_hard, dim, positive, inv_temperature, exclude_self,
                                       column_anchors, dtype, stream),
                          row_stats, row_weight, column_lse, column_weight, d_query, d_key, d_hard, dtemp);
}

}  // namespace

#define FASTCL_INFO_NCE_PROBLEM                                                                          \
  "query key hard ld_query ld_key hard_row_stride hard_slot_stride batch num_keys num_hard dim positive " \
  "inv_temperature exclude_self column_anchors dtype stream "
FASTCL_EXPORT(info_nce_cuda_forward, &forward, FASTCL_INFO_NCE_PROBLEM "row_stats column_shift column_sums",
              "InfoNCE forward on the GPU (see csrc/cuda/info_nce_cuda.h); pointer 0 means absent.");
FASTCL_EXPORT(info_nce_cuda_backward, &backward,
              FASTCL_INFO_NCE_PROBLEM "row_stats row_weight column_lse column_weight d_query d_key d_hard dtemp",
              "InfoNCE backward on the GPU (see csrc/cuda/info_nce_cuda.h); gradient buffers are fp32 and accumulated.");

}  // namespace fastcl
