// InfoNCE forward and backward in plain CUDA: shared-memory tiling, fp32 accumulation, no cuBLAS.
//
// s_ij = q_i . k_j / tau. Each thread block owns TILE = 64 query rows and walks over the keys
// in TILE-wide tiles; a tile of similarities is computed in shared memory from CHUNK-wide
// slices of the embedding dimension (any dim: the tail is zero-padded).
//
// Forward: threads 0..63 keep one row's running max / sum of exp (online log-sum-exp) and its
// positive score; for the symmetric loss threads 64..127 add, for one key column each, the
// tile's sum of exp(s_ij - shift_j) with an atomic (shift_j = the diagonal score, so the column
// sum is >= 1; Python recomputes the column direction on its own if a sum overflows).
// Backward: the tile is turned in place into g = dL/ds (both directions), then d_query of the
// block's rows (owned, plain read-add-write) and d_key (atomics) are accumulated chunk by chunk
// of the dimension; hard negatives are handled one warp per row.
#include "info_nce_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

namespace fastcl {
namespace cuda {
namespace {

constexpr int kTile = 64;    // rows and key columns per tile
constexpr int kChunk = 32;   // embedding dimensions per shared-memory slice
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
struct Views {
  const T* query;
  const T* key;
  const T* hard;
};

template <typename T>
__device__ Views<T> views(const InfoNCEProblem& p) {
  return {reinterpret_cast<const T*>(p.query), reinterpret_cast<const T*>(p.key), reinterpret_cast<const T*>(p.hard)};
}

struct Shared {
  float query[kTile][kChunk + 1];  // +1: conflict-free column reads
  float key[kTile][kChunk + 1];
  float tile[kTile][kTile + 1];
};

// Loads a kTile x kChunk slice (rows row0.., dims d0..) as fp32, zero outside the matrix.
template <typename T>
__device__ void load_slice(float (*dst)[kChunk + 1], const T* src, int64_t ld, int64_t rows, int64_t row0,
                           int64_t dim, int64_t d0) {
  for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
    const int r = e / kChunk, c = e % kChunk;
    const int64_t row = row0 + r, d = d0 + c;
    dst[r][c] = (row < rows && d < dim) ? to_float(src[row * ld + d]) : 0.0f;
  }
}

// shared.tile <- raw similarities of query rows row0.. with key rows col0.. (fp32).
template <typename T>
__device__ void tile_similarity(Shared& shared, const InfoNCEProblem& p, const Views<T>& v, int64_t row0,
                                int64_t col0) {
  // thread (ty, tx) of a 16 x 16 grid computes rows ty + 16 i and columns tx + 16 j
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t d0 = 0; d0 < p.dim; d0 += kChunk) {
    load_slice(shared.query, v.query, p.ld_query, p.batch, row0, p.dim, d0);
    load_slice(shared.key, v.key, p.ld_key, p.num_keys, col0, p.dim, d0);
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kChunk; ++c) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = shared.query[ty + 16 * i][c];
        b[i] = shared.key[tx + 16 * i][c];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) shared.tile[ty + 16 * i][tx + 16 * j] = acc[i][j];
  __syncthreads();
}

// q_row . hard[row, slot] reduced over one warp (every lane gets the result).
template <typename T>
__device__ float warp_hard_dot(const InfoNCEProblem& p, const Views<T>& v, int64_t row, int64_t slot) {
  const int lane = threadIdx.x % 32;
  const T* q = v.query + row * p.ld_query;
  const T* h = v.hard + row * p.hard_row_stride + slot * p.hard_slot_stride;
  float sum = 0.0f;
  for (int64_t d = lane; d < p.dim; d += 32) sum += to_float(q[d]) * to_float(h[d]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  return sum;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) info_nce_fwd_kernel_rows(InfoNCEProblem p, float* row_stats,
                                                                     const float* column_shift,
                                                                     float* column_sums) {
  __shared__ Shared shared;
  __shared__ float hard_scores[kTile];
  const Views<T> v = views<T>(p);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t my_row = row0 + threadIdx.x;
  const bool owns_row = threadIdx.x < kTile && my_row < p.batch;
  const int64_t positive = owns_row ? reinterpret_cast<const int64_t*>(p.positive)[my_row] : -1;
  float row_max = -INFINITY, row_sum = 0.0f, positive_score = 0.0f;

  for (int64_t col0 = 0; col0 < p.num_keys; col0 += kTile) {
    tile_similarity(shared, p, v, row0, col0);
    if (owns_row) {
      const int r = threadIdx.x;
      for (int c = 0; c < kTile && col0 + c < p.num_keys; ++c) {
        const int64_t col = col0 + c;
        if (p.exclude_self && col == my_row) continue;
        const float s = shared.tile[r][c] * p.inv_temperature;
        if (s > row_max) {
          row_sum = row_sum * __expf(row_max - s) + 1.0f;
          row_max = s;
        } else {
          row_sum += __expf(s - row_max);
        }
        if (col == positive) positive_score = s;
      }
    } else if (threadIdx.x >= kTile && threadIdx.x < 2 * kTile && col0 < p.column_anchors) {
      const int c = threadIdx.x - kTile;
      const int64_t col = col0 + c;
      if (col < p.column_anchors) {
        const float shift = column_shift[col];
        float sum = 0.0f;
        for (int r = 0; r < kTile && row0 + r < p.batch; ++r) sum += __expf(shared.tile[r][c] * p.inv_temperature - shift);
        atomicAdd(column_sums + col, sum);
      }
    }
    __syncthreads();
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t slot = 0; slot < p.num_hard; ++slot) {
    for (int r = warp; r < kTile; r += kWarps) {
      const int64_t row = row0 + r;
      if (row < p.batch) {
        const float dot = warp_hard_dot(p, v, row, slot);
        if (lane == 0) hard_scores[r] = dot * p.inv_temperature;
      }
    }
    __syncthreads();
    if (owns_row) {
      const float s = hard_scores[threadIdx.x];
      if (s > row_max) {
        row_sum = row_sum * __expf(row_max - s) + 1.0f;
        row_max = s;
      } else {
        row_sum += __expf(s - row_max);
      }
    }
    __syncthreads();
  }

  if (owns_row) {
    row_stats[2 * my_row] = row_max + logf(row_sum);
    row_stats[2 * my_row + 1] = positive_score;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) info_nce_bwd_kernel_rows(
    InfoNCEProblem p, const float* row_stats, const float* row_weight, const float* column_lse,
    const float* column_weight, float* d_query, float* d_key, float* d_hard, float* dtemp) {
  __shared__ Shared shared;
  __shared__ float lse[kTile], weight[kTile], dtemp_rows[kTile];
  __shared__ int64_t positive[kTile];
  const Views<T> v = views<T>(p);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  if (threadIdx.x < kTile) {
    const int64_t row = row0 + threadIdx.x;
    const bool valid = row < p.batch;
    lse[threadIdx.x] = valid ? row_stats[2 * row] : 0.0f;
    weight[threadIdx.x] = valid ? row_weight[row] : 0.0f;
    positive[threadIdx.x] = valid ? reinterpret_cast<const int64_t*>(p.positive)[row] : -1;
    dtemp_rows[threadIdx.x] = 0.0f;
  }
  __syncthreads();

  for (int64_t col0 = 0; col0 < p.num_keys; col0 += kTile) {
    tile_similarity(shared, p, v, row0, col0);
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      const int64_t row = row0 + r, col = col0 + c;
      float g = 0.0f;
      if (row < p.batch && col < p.num_keys) {
        const float s = shared.tile[r][c] * p.inv_temperature;
        if (!(p.exclude_self && col == row)) g = weight[r] * (__expf(s - lse[r]) - (col == positive[r] ? 1.0f : 0.0f));
        if (col < p.column_anchors) g += column_weight[col] * (__expf(s - column_lse[col]) - (col == row ? 1.0f : 0.0f));
        if (g != 0.0f) atomicAdd(dtemp_rows + r, g * s);
      }
      shared.tile[r][c] = g * p.inv_temperature;  // now dL/d(raw similarity)
    }
    __syncthreads();
    for (int64_t d0 = 0; d0 < p.dim; d0 += kChunk) {
      load_slice(shared.query, v.query, p.ld_query, p.batch, row0, p.dim, d0);
      load_slice(shared.key, v.key, p.ld_key, p.num_keys, col0, p.dim, d0);
      __syncthreads();
      for (int o = threadIdx.x; o < kTile * kChunk; o += kThreads) {
        const int i = o / kChunk, d = o % kChunk;
        float to_query = 0.0f, to_key = 0.0f;
#pragma unroll 8
        for (int t = 0; t < kTile; ++t) {
          to_query += shared.tile[i][t] * shared.key[t][d];    // row i of the block
          to_key += shared.tile[t][i] * shared.query[t][d];    // key column i of the tile
        }
        const int64_t dim_index = d0 + d;
        if (dim_index < p.dim) {
          if (row0 + i < p.batch) d_query[(row0 + i) * p.dim + dim_index] += to_query;
          if (col0 + i < p.num_keys) atomicAdd(d_key + (col0 + i) * p.dim + dim_index, to_key);
        }
      }
      __syncthreads();
    }
  }

  // hard negatives: never positives; one warp per row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kTile; r += kWarps) {
    const int64_t row = row0 + r;
    if (row >= p.batch) continue;
    const T* q = v.query + row * p.ld_query;
    for (int64_t slot = 0; slot < p.num_hard; ++slot) {
      const float s = warp_hard_dot(p, v, row, slot) * p.inv_temperature;
      const float g = weight[r] * __expf(s - lse[r]);
      if (lane == 0) dtemp_rows[r] += g * s;
      const float coefficient = g * p.inv_temperature;
      const T* h = v.hard + row * p.hard_row_stride + slot * p.hard_slot_stride;
      float* dh = d_hard + (row * p.num_hard + slot) * p.dim;
      for (int64_t d = lane; d < p.dim; d += 32) {
        d_query[row * p.dim + d] += coefficient * to_float(h[d]);
        dh[d] = coefficient * to_float(q[d]);
      }
    }
  }
  __syncthreads();
  if (threadIdx.x < kTile && row0 + threadIdx.x < p.batch) dtemp[row0 + threadIdx.x] = dtemp_rows[threadIdx.x];
}

void check_launch(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
}

void check_problem(const InfoNCEProblem& p) {
  if (p.batch <= 0 || p.num_keys <= 0 || p.dim <= 0) throw std::invalid_argument("info_nce CUDA: empty problem");
  if (p.query == 0 || p.key == 0 || p.positive == 0) throw std::invalid_argument("info_nce CUDA: null input pointer");
  if (p.num_hard > 0 && p.hard == 0) throw std::invalid_argument("info_nce CUDA: num_hard > 0 without hard negatives");
  if (p.column_anchors > p.num_keys || p.column_anchors > p.batch)
    throw std::invalid_argument("info_nce CUDA: column_anchors must be <= min(batch, num_keys)");
}

dim3 grid_for(const InfoNCEProblem& p) { return dim3(static_cast<unsigned>((p.batch + kTile - 1) / kTile)); }

}  // namespace

void info_nce_forward(const InfoNCEProblem& p, std::uintptr_t row_stats, std::uintptr_t column_shift,
                      std::uintptr_t column_sums) {
  check_problem(p);
  if (row_stats == 0) throw std::invalid_argument("info_nce CUDA forward: null row_stats");
  if (p.column_anchors > 0 && (column_shift == 0 || column_sums == 0))
    throw std::invalid_argument("info_nce CUDA forward: column_anchors > 0 needs column_shift and column_sums");
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  auto* stats = reinterpret_cast<float*>(row_stats);
  auto* shift = reinterpret_cast<const float*>(column_shift);
  auto* sums = reinterpret_cast<float*>(column_sums);
  switch (p.dtype) {
    case DType::kFloat32:
      info_nce_fwd_kernel_rows<float><<<grid_for(p), kThreads, 0, stream>>>(p, stats, shift, sums);
      break;
    case DType::kFloat16:
      info_nce_fwd_kernel_rows<__half><<<grid_for(p), kThreads, 0, stream>>>(p, stats, shift, sums);
      break;
    case DType::kBFloat16:
      info_nce_fwd_kernel_rows<__nv_bfloat16><<<grid_for(p), kThreads, 0, stream>>>(p, stats, shift, sums);
      break;
  }
  check_launch("info_nce_fwd_kernel_rows");
}

void info_nce_backward(const InfoNCEProblem& p, std::uintptr_t row_stats, std::uintptr_t row_weight,
                       std::uintptr_t column_lse, std::uintptr_t column_weight, std::uintptr_t d_query,
                       std::uintptr_t d_key, std::uintptr_t d_hard, std::uintptr_t dtemp) {
  check_problem(p);
  if (row_stats == 0 || row_weight == 0 || d_query == 0 || d_key == 0 || dtemp == 0)
    throw std::invalid_argument("info_nce CUDA backward: null statistics or gradient buffer");
  if (p.num_hard > 0 && d_hard == 0) throw std::invalid_argument("info_nce CUDA backward: hard negatives need d_hard");
  if (p.column_anchors > 0 && (column_lse == 0 || column_weight == 0))
    throw std::invalid_argument("info_nce CUDA backward: column_anchors > 0 needs column_lse and column_weight");
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  auto* stats = reinterpret_cast<const float*>(row_stats);
  auto* weights = reinterpret_cast<const float*>(row_weight);
  auto* col_lse = reinterpret_cast<const float*>(column_lse);
  auto* col_weight = reinterpret_cast<const float*>(column_weight);
  auto* dq = reinterpret_cast<float*>(d_query);
  auto* dk = reinterpret_cast<float*>(d_key);
  auto* dh = reinterpret_cast<float*>(d_hard);
  auto* dt = reinterpret_cast<float*>(dtemp);
  switch (p.dtype) {
    case DType::kFloat32:
      info_nce_bwd_kernel_rows<float><<<grid_for(p), kThreads, 0, stream>>>(p, stats, weights, col_lse, col_weight,
                                                                             dq, dk, dh, dt);
      break;
    case DType::kFloat16:
      info_nce_bwd_kernel_rows<__half><<<grid_for(p), kThreads, 0, stream>>>(p, stats, weights, col_lse, col_weight,
                                                                              dq, dk, dh, dt);
      break;
    case DType::kBFloat16:
      info_nce_bwd_kernel_rows<__nv_bfloat16><<<grid_for(p), kThreads, 0, stream>>>(p, stats, weights, col_lse,
                                                                                     col_weight, dq, dk, dh, dt);
      break;
  }
  check_launch("info_nce_bwd_kernel_rows");
}

}  // namespace cuda
}  // namespace fastcl
