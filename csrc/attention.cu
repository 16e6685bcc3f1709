// Attention with a relative position bias shared by the batch: CUDA C++ version of kernels/attention.py.
//
// out = softmax(q k^T * scale + bias) v for q, k, v [B, H, N, Dh] (any batch/head/row strides, unit
// stride along Dh) and bias [H, N, N]; fp32 arithmetic on CUDA cores, inputs in fp32/bf16/fp16.
// This is the portable reference backend (no tensor cores, so several times slower than the
// Triton kernels on an A100/H100): it serves where Triton is unavailable and as a second,
// independent implementation in the tests. `auto` prefers Triton.
// Like the Triton kernels, no [B, H, N, N] tensor is ever written:
//   forward  a block owns 16 query rows (4 warps x 4 rows) and streams key tiles of 32 through
//            shared memory, one key per lane, with an online softmax; writes out and the
//            log-sum-exp (LSE) [B, H, N].
//   dq       same layout; recomputes P from the LSE; also writes delta = rowsum(dO * O).
//   dk, dv   a block owns 8 key rows and streams query tiles of 32, one query per lane; the
//            bias tile [32 queries][8 keys] is staged through shared memory, read along keys
//            (reading it directly, lane = query, would touch 32 rows per load).
//   dbias    a block owns a 32 x 32 tile of one head and loops over the batch, summing dS in
//            registers: the batch reduction happens in the kernel, in a fixed order, so dbias is
//            deterministic by construction.
// Outputs out, dq, dk, dv are [B, H, N, Dh] views of [B, N, H, Dh] memory, as the Python op's.
// ptxas (nvcc 13.0, -Xptxas -v) at Dh = 64 (kDimsPerLane = 2), sm_80 / sm_90 registers, static
// shared memory: forward 72 / 52, 20.3 KB; dq 80 (8 bytes spilled) / 64, 24.3 KB; dk/dv 72 / 48,
// 21.4 KB; dbias 40 / 40, 16.5 KB. At Dh = 128 the forward and dk/dv take 98-99 / 94-96 registers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

// fp32, fp16 and bf16 (AT_DISPATCH_FLOATING_TYPES would also compile every kernel for double).
#define BEITV2_DISPATCH_ATTENTION_TYPES(TYPE, NAME, ...)                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                  \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)               \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace beitv2_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;               // query rows per warp (forward, dq)
constexpr int kQueryRows = kWarps * kRowsPerWarp;
// dq holds q and dO rows: half the rows at Dh > 64 keep its shared memory < 48 KB, without spills.
constexpr int dq_rows_per_warp(int dims_per_lane) { return dims_per_lane > 2 ? 2 : 4; }
constexpr int kKeyRowsPerWarp = 2;            // key rows per warp (dk, dv): keeps shared memory < 48 KB
constexpr int kKeyRows = kWarps * kKeyRowsPerWarp;
constexpr int kTile = 32;                     // keys (or queries) per streamed tile: one per lane
constexpr int kBiasThreads = 256;             // dbias: a 32 x 32 tile, 4 pairs per thread
constexpr int kBiasPairsPerThread = kTile * kTile / kBiasThreads;
constexpr unsigned kFullMask = 0xffffffffu;

struct HeadStrides {
  int64_t b, h, n;
};

HeadStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

struct BiasView {
  const void* data;  // nullptr: no bias
  int64_t h, m, n;   // strides
};

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

template <typename scalar_t>
__device__ __forceinline__ float bias_at(const BiasView& bias, int64_t head, int64_t row, int64_t col) {
  if (bias.data == nullptr) return 0.f;
  return static_cast<float>(static_cast<const scalar_t*>(bias.data)[head * bias.h + row * bias.m + col * bias.n]);
}

// Rows [row0, row0 + rows) of one head into shared memory as fp32, zero past n or head_dim.
template <typename scalar_t, int kStride>
__device__ __forceinline__ void load_rows(float (*tile)[kStride], const scalar_t* head, int64_t row_stride, int row0,
                                          int rows, int n, int head_dim, int dim) {
  for (int idx = threadIdx.x; idx < rows * dim; idx += blockDim.x) {
    const int r = idx / dim, d = idx % dim, row = row0 + r;
    tile[r][d] = (row < n && d < head_dim) ? static_cast<float>(head[row * row_stride + d]) : 0.f;
  }
}

template <typename scalar_t, int kDimsPerLane>
__global__ void __launch_bounds__(kThreads) relpos_attention_fwd_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v, BiasView bias,
    scalar_t* __restrict__ out, float* __restrict__ lse, HeadStrides sq, HeadStrides sk, HeadStrides sv, HeadStrides so,
    int heads, int n, int head_dim, float scale) {
  constexpr int kDim = 32 * kDimsPerLane;
  __shared__ float q_tile[kQueryRows][kDim];
  __shared__ float k_tile[kTile][kDim + 1];  // +1: lanes read different rows without bank conflicts
  __shared__ float v_tile[kTile][kDim + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_blocks = (n + kQueryRows - 1) / kQueryRows;
  const int64_t bh = blockIdx.x / row_blocks, b = bh / heads, h = bh % heads;
  const int row0 = (blockIdx.x % row_blocks) * kQueryRows;
  load_rows<scalar_t, kDim>(q_tile, q + b * sq.b + h * sq.h, sq.n, row0, kQueryRows, n, head_dim, kDim);
  const scalar_t* k_head = k + b * sk.b + h * sk.h;
  const scalar_t* v_head = v + b * sv.b + h * sv.h;

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDimsPerLane];
  #pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
    #pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[r][i] = 0.f;
  }
  for (int key0 = 0; key0 < n; key0 += kTile) {
    __syncthreads();  // the previous tiles are consumed (and q_tile is written, the first time)
    load_rows<scalar_t, kDim + 1>(k_tile, k_head, sk.n, key0, kTile, n, head_dim, kDim);
    load_rows<scalar_t, kDim + 1>(v_tile, v_head, sv.n, key0, kTile, n, head_dim, kDim);
    __syncthreads();
    float s[kRowsPerWarp] = {};
    #pragma unroll 8
    for (int d = 0; d < kDim; ++d) {
      const float kd = k_tile[lane][d];
      #pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s[r] = fmaf(q_tile[warp * kRowsPerWarp + r][d], kd, s[r]);
    }
    const int key = key0 + lane;
    #pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = row0 + warp * kRowsPerWarp + r;
      const float score =
          (key < n) ? s[r] * scale + (row < n ? bias_at<scalar_t>(bias, h, row, key) : 0.f) : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(score));
      const float m_safe = (m_new == -INFINITY) ? 0.f : m_new;  // all -inf so far: p = 0, not NaN
      const float p = expf(score - m_safe);
      const float alpha = expf(m[r] - m_safe);
      l[r] = l[r] * alpha + warp_sum(p);
      m[r] = m_new;
      #pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) acc[r][i] *= alpha;
      #pragma unroll 8
      for (int j = 0; j < kTile; ++j) {
        const float pj = __shfl_sync(kFullMask, p, j);
        #pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) acc[r][i] = fmaf(pj, v_tile[j][lane + 32 * i], acc[r][i]);
      }
    }
  }
  #pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = row0 + warp * kRowsPerWarp + r;
    if (row >= n) continue;
    scalar_t* out_row = out + b * so.b + h * so.h + row * so.n;
    #pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) out_row[d] = static_cast<scalar_t>(acc[r][i] / l[r]);
    }
    if (lane == 0) lse[bh * n + row] = m[r] + logf(l[r]);
  }
}

template <typename scalar_t, int kDimsPerLane>
__global__ void __launch_bounds__(kThreads) relpos_attention_bwd_dq_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v, BiasView bias,
    const scalar_t* __restrict__ out, const scalar_t* __restrict__ dout, const float* __restrict__ lse,
    float* __restrict__ delta, scalar_t* __restrict__ dq, HeadStrides sq, HeadStrides sk, HeadStrides sv,
    HeadStrides so, HeadStrides sdo, HeadStrides sdq, int heads, int n, int head_dim, float scale) {
  constexpr int kDim = 32 * kDimsPerLane;
  constexpr int kRowsPerWarp = dq_rows_per_warp(kDimsPerLane), kQueryRows = kWarps * kRowsPerWarp;
  __shared__ float q_tile[kQueryRows][kDim];
  __shared__ float do_tile[kQueryRows][kDim];
  __shared__ float k_tile[kTile][kDim + 1];
  __shared__ float v_tile[kTile][kDim + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_blocks = (n + kQueryRows - 1) / kQueryRows;
  const int64_t bh = blockIdx.x / row_blocks, b = bh / heads, h = bh % heads;
  const int row0 = (blockIdx.x % row_blocks) * kQueryRows;
  load_rows<scalar_t, kDim>(q_tile, q + b * sq.b + h * sq.h, sq.n, row0, kQueryRows, n, head_dim, kDim);
  load_rows<scalar_t, kDim>(do_tile, dout + b * sdo.b + h * sdo.h, sdo.n, row0, kQueryRows, n, head_dim, kDim);
  __syncthreads();

  // delta_i = <dO_i, O_i> for this warp's rows; the dk/dv and dbias kernels read it.
  float row_delta[kRowsPerWarp], row_lse[kRowsPerWarp], acc[kRowsPerWarp][kDimsPerLane];
  #pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = row0 + warp * kRowsPerWarp + r;
    float partial = 0.f;
    if (row < n) {
      const scalar_t* o_row = out + b * so.b + h * so.h + row * so.n;
      for (int d = lane; d < head_dim; d += 32) partial += do_tile[warp * kRowsPerWarp + r][d] * float(o_row[d]);
    }
    row_delta[r] = warp_sum(partial);
    row_lse[r] = (row < n) ? lse[bh * n + row] : INFINITY;  // padded rows: P = 0
    if (row < n && lane == 0) delta[bh * n + row] = row_delta[r];
    #pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[r][i] = 0.f;
  }
  const scalar_t* k_head = k + b * sk.b + h * sk.h;
  const scalar_t* v_head = v + b * sv.b + h * sv.h;
  for (int key0 = 0; key0 < n; key0 += kTile) {
    __syncthreads();
    load_rows<scalar_t, kDim + 1>(k_tile, k_head, sk.n, key0, kTile, n, head_dim, kDim);
    load_rows<scalar_t, kDim + 1>(v_tile, v_head, sv.n, key0, kTile, n, head_dim, kDim);
    __syncthreads();
    float s[kRowsPerWarp] = {}, dp[kRowsPerWarp] = {};
    #pragma unroll 8
    for (int d = 0; d < kDim; ++d) {
      const float kd = k_tile[lane][d], vd = v_tile[lane][d];
      #pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        s[r] = fmaf(q_tile[warp * kRowsPerWarp + r][d], kd, s[r]);
        dp[r] = fmaf(do_tile[warp * kRowsPerWarp + r][d], vd, dp[r]);
      }
    }
    const int key = key0 + lane;
    #pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = row0 + warp * kRowsPerWarp + r;
      float ds = 0.f;
      if (key < n && row < n) {
        const float p = expf(s[r] * scale + bias_at<scalar_t>(bias, h, row, key) - row_lse[r]);
        ds = p * (dp[r] - row_delta[r]);
      }
      #pragma unroll 8
      for (int j = 0; j < kTile; ++j) {
        const float dsj = __shfl_sync(kFullMask, ds, j);
        #pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) acc[r][i] = fmaf(dsj, k_tile[j][lane + 32 * i], acc[r][i]);
      }
    }
  }
  #pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = row0 + warp * kRowsPerWarp + r;
    if (row >= n) continue;
    scalar_t* dq_row = dq + b * sdq.b + h * sdq.h + row * sdq.n;
    #pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) dq_row[d] = static_cast<scalar_t>(acc[r][i] * scale);
    }
  }
}

template <typename scalar_t, int kDimsPerLane>
__global__ void __launch_bounds__(kThreads) relpos_attention_bwd_dkdv_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v, BiasView bias,
    const scalar_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
    scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, HeadStrides sq, HeadStrides sk, HeadStrides sv,
    HeadStrides sdo, HeadStrides sdk, HeadStrides sdv, int heads, int n, int head_dim, float scale) {
  constexpr int kDim = 32 * kDimsPerLane;
  __shared__ float k_rows[kKeyRows][kDim];
  __shared__ float v_rows[kKeyRows][kDim];
  __shared__ float q_tile[kTile][kDim + 1];
  __shared__ float do_tile[kTile][kDim + 1];
  // bias[h, q0 + i, key0 + j]: read row by row (the keys of a query are contiguous), then each
  // lane (a query) reads its row here; +1 keeps those column reads free of bank conflicts.
  __shared__ float bias_tile[kTile][kKeyRows + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key_blocks = (n + kKeyRows - 1) / kKeyRows;
  const int64_t bh = blockIdx.x / key_blocks, b = bh / heads, h = bh % heads;
  const int key0 = (blockIdx.x % key_blocks) * kKeyRows;
  load_rows<scalar_t, kDim>(k_rows, k + b * sk.b + h * sk.h, sk.n, key0, kKeyRows, n, head_dim, kDim);
  load_rows<scalar_t, kDim>(v_rows, v + b * sv.b + h * sv.h, sv.n, key0, kKeyRows, n, head_dim, kDim);
  const scalar_t* q_head = q + b * sq.b + h * sq.h;
  const scalar_t* do_head = dout + b * sdo.b + h * sdo.h;

  float dk_acc[kKeyRowsPerWarp][kDimsPerLane] = {}, dv_acc[kKeyRowsPerWarp][kDimsPerLane] = {};
  for (int q0 = 0; q0 < n; q0 += kTile) {
    __syncthreads();
    load_rows<scalar_t, kDim + 1>(q_tile, q_head, sq.n, q0, kTile, n, head_dim, kDim);
    load_rows<scalar_t, kDim + 1>(do_tile, do_head, sdo.n, q0, kTile, n, head_dim, kDim);
    for (int idx = threadIdx.x; idx < kTile * kKeyRows; idx += blockDim.x) {
      const int i = idx / kKeyRows, j = idx % kKeyRows;
      const int query = q0 + i, key = key0 + j;
      bias_tile[i][j] = (query < n && key < n) ? bias_at<scalar_t>(bias, h, query, key) : 0.f;
    }
    __syncthreads();
    const int query = q0 + lane;
    const float query_lse = (query < n) ? lse[bh * n + query] : INFINITY;
    const float query_delta = (query < n) ? delta[bh * n + query] : 0.f;
    float s[kKeyRowsPerWarp] = {}, dp[kKeyRowsPerWarp] = {};
    #pragma unroll 8
    for (int d = 0; d < kDim; ++d) {
      const float qd = q_tile[lane][d], dod = do_tile[lane][d];
      #pragma unroll
      for (int r = 0; r < kKeyRowsPerWarp; ++r) {
        s[r] = fmaf(qd, k_rows[warp * kKeyRowsPerWarp + r][d], s[r]);
        dp[r] = fmaf(dod, v_rows[warp * kKeyRowsPerWarp + r][d], dp[r]);
      }
    }
    #pragma unroll
    for (int r = 0; r < kKeyRowsPerWarp; ++r) {
      const int key = key0 + warp * kKeyRowsPerWarp + r;
      float p = 0.f, ds = 0.f;
      if (query < n && key < n) {
        p = expf(s[r] * scale + bias_tile[lane][warp * kKeyRowsPerWarp + r] - query_lse);
        ds = p * (dp[r] - query_delta);
      }
      #pragma unroll 8
      for (int j = 0; j < kTile; ++j) {
        const float pj = __shfl_sync(kFullMask, p, j), dsj = __shfl_sync(kFullMask, ds, j);
        #pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) {
          dv_acc[r][i] = fmaf(pj, do_tile[j][lane + 32 * i], dv_acc[r][i]);
          dk_acc[r][i] = fmaf(dsj, q_tile[j][lane + 32 * i], dk_acc[r][i]);
        }
      }
    }
  }
  #pragma unroll
  for (int r = 0; r < kKeyRowsPerWarp; ++r) {
    const int key = key0 + warp * kKeyRowsPerWarp + r;
    if (key >= n) continue;
    scalar_t* dk_row = dk + b * sdk.b + h * sdk.h + key * sdk.n;
    scalar_t* dv_row = dv + b * sdv.b + h * sdv.h + key * sdv.n;
    #pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d >= head_dim) continue;
      dk_row[d] = static_cast<scalar_t>(dk_acc[r][i] * scale);
      dv_row[d] = static_cast<scalar_t>(dv_acc[r][i]);
    }
  }
}

// dbias[h, i, j] = sum_b dS[b, h, i, j] for one 32 x 32 tile, summed over the batch in order.
template <typename scalar_t>
__global__ void __launch_bounds__(kBiasThreads) relpos_attention_bwd_dbias_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v, BiasView bias,
    const scalar_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dbias, HeadStrides sq, HeadStrides sk, HeadStrides sv, HeadStrides sdo, int batch, int heads,
    int n, int head_dim, float scale) {
  __shared__ float q_chunk[kTile][kTile + 1];
  __shared__ float do_chunk[kTile][kTile + 1];
  __shared__ float k_chunk[kTile][kTile + 1];
  __shared__ float v_chunk[kTile][kTile + 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;  // pair u: query warp + 8u, key lane
  const int query0 = blockIdx.x * kTile, key0 = blockIdx.y * kTile;
  const int64_t h = blockIdx.z;
  const int key = key0 + lane;
  float bias_ij[kBiasPairsPerThread], acc[kBiasPairsPerThread] = {};
  #pragma unroll
  for (int u = 0; u < kBiasPairsPerThread; ++u) {
    const int query = query0 + warp + 8 * u;
    bias_ij[u] = (query < n && key < n) ? bias_at<scalar_t>(bias, h, query, key) : 0.f;
  }
  for (int b = 0; b < batch; ++b) {
    const int64_t bh = static_cast<int64_t>(b) * heads + h;
    float s[kBiasPairsPerThread] = {}, dp[kBiasPairsPerThread] = {};
    for (int d0 = 0; d0 < head_dim; d0 += kTile) {
      const int dims = min(kTile, head_dim - d0);
      __syncthreads();
      load_rows<scalar_t, kTile + 1>(q_chunk, q + b * sq.b + h * sq.h + d0, sq.n, query0, kTile, n, dims, kTile);
      load_rows<scalar_t, kTile + 1>(do_chunk, dout + b * sdo.b + h * sdo.h + d0, sdo.n, query0, kTile, n, dims, kTile);
      load_rows<scalar_t, kTile + 1>(k_chunk, k + b * sk.b + h * sk.h + d0, sk.n, key0, kTile, n, dims, kTile);
      load_rows<scalar_t, kTile + 1>(v_chunk, v + b * sv.b + h * sv.h + d0, sv.n, key0, kTile, n, dims, kTile);
      __syncthreads();
      #pragma unroll 8
      for (int d = 0; d < kTile; ++d) {
        const float kd = k_chunk[lane][d], vd = v_chunk[lane][d];
        #pragma unroll
        for (int u = 0; u < kBiasPairsPerThread; ++u) {
          s[u] = fmaf(q_chunk[warp + 8 * u][d], kd, s[u]);
          dp[u] = fmaf(do_chunk[warp + 8 * u][d], vd, dp[u]);
        }
      }
    }
    #pragma unroll
    for (int u = 0; u < kBiasPairsPerThread; ++u) {
      const int query = query0 + warp + 8 * u;
      if (query >= n || key >= n) continue;
      const float p = expf(s[u] * scale + bias_ij[u] - lse[bh * n + query]);
      acc[u] += p * (dp[u] - delta[bh * n + query]);
    }
  }
  #pragma unroll
  for (int u = 0; u < kBiasPairsPerThread; ++u) {
    const int query = query0 + warp + 8 * u;
    if (query < n && key < n) dbias[(h * n + query) * n + key] = acc[u];
  }
}

// --------------------------------------------------------------------------------------------
// Host side
// --------------------------------------------------------------------------------------------
void check_head_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "beitv2_cuda::relpos_attention: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 4 && t.sizes() == q.sizes(), "beitv2_cuda::relpos_attention: ", name,
              " must have the shape of q [B, H, N, Dh] ", q.sizes(), "; got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "beitv2_cuda::relpos_attention: ", name,
              " must have the dtype of q");
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, "beitv2_cuda::relpos_attention: ", name,
              " must have unit stride along Dh");
}

BiasView bias_view(const c10::optional<at::Tensor>& bias, const at::Tensor& q) {
  if (!bias.has_value()) return {nullptr, 0, 0, 0};
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.is_cuda() && b.dim() == 3 && b.size(0) == q.size(1) && b.size(1) == q.size(2) && b.size(2) == q.size(2),
              "beitv2_cuda::relpos_attention: bias must be a CUDA tensor [H, N, N]; got ", b.sizes());
  TORCH_CHECK(b.scalar_type() == q.scalar_type(), "beitv2_cuda::relpos_attention: bias must have the dtype of q");
  return {b.data_ptr(), b.stride(0), b.stride(1), b.stride(2)};
}

at::Tensor empty_bnhd(const at::Tensor& like) {
  return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options()).transpose(1, 2);
}

// Calls fn.template operator()<kDimsPerLane>() for the head-dim tile (32, 64, 96 or 128).
template <typename Fn>
void dispatch_head_dim(int64_t head_dim, Fn&& fn) {
  TORCH_CHECK(head_dim >= 1 && head_dim <= 128, "beitv2_cuda::relpos_attention: Dh must be between 1 and 128; got ",
              head_dim);
  if (head_dim <= 32) {
    fn.template operator()<1>();
  } else if (head_dim <= 64) {
    fn.template operator()<2>();
  } else if (head_dim <= 96) {
    fn.template operator()<3>();
  } else {
    fn.template operator()<4>();
  }
}

std::tuple<at::Tensor, at::Tensor> relpos_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const c10::optional<at::Tensor>& bias, double scale) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 4, "beitv2_cuda::relpos_attention: q must be a CUDA tensor [B, H, N, Dh]");
  check_head_tensor(q, "q", q);
  check_head_tensor(k, "k", q);
  check_head_tensor(v, "v", q);
  const BiasView bias_ptr = bias_view(bias, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), head_dim = q.size(3);
  at::Tensor out = empty_bnhd(q);
  at::Tensor lse = at::empty({batch, heads, n}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  // One grid axis (the others stop at 65535): the row blocks of one head are neighbours.
  const dim3 grid(static_cast<unsigned>((n + kQueryRows - 1) / kQueryRows * batch * heads));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  BEITV2_DISPATCH_ATTENTION_TYPES(q.scalar_type(), "relpos_attention", [&] {
    dispatch_head_dim(head_dim, [&]<int kDimsPerLane>() {
      relpos_attention_fwd_kernel<scalar_t, kDimsPerLane><<<grid, kThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), bias_ptr, out.data_ptr<scalar_t>(),
          lse.data_ptr<float>(), strides_of(q), strides_of(k), strides_of(v), strides_of(out), heads, n, head_dim,
          static_cast<float>(scale));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> relpos_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, double scale,
    bool need_dbias) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 4, "beitv2_cuda::relpos_attention_backward: q must be a CUDA tensor");
  check_head_tensor(grad_out, "grad_out", q);
  check_head_tensor(k, "k", q);
  check_head_tensor(v, "v", q);
  check_head_tensor(out, "out", q);
  TORCH_CHECK(lse.is_cuda() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.numel() == q.size(0) * q.size(1) * q.size(2),
              "beitv2_cuda::relpos_attention_backward: lse must be a contiguous fp32 CUDA tensor [B, H, N]");
  TORCH_CHECK(!need_dbias || bias.has_value(), "beitv2_cuda::relpos_attention_backward: need_dbias without a bias");
  const BiasView bias_ptr = bias_view(bias, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), head_dim = q.size(3);
  at::Tensor dq = empty_bnhd(q), dk = empty_bnhd(k), dv = empty_bnhd(v);
  at::Tensor dbias = need_dbias ? at::zeros({heads, n, n}, q.options().dtype(at::kFloat))
                                : at::empty({0}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), dbias};
  at::Tensor delta = at::empty_like(lse);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float scale_f = static_cast<float>(scale);
  BEITV2_DISPATCH_ATTENTION_TYPES(q.scalar_type(), "relpos_attention_backward", [&] {
    dispatch_head_dim(head_dim, [&]<int kDimsPerLane>() {
      constexpr int kDqRows = kWarps * dq_rows_per_warp(kDimsPerLane);
      const dim3 dq_grid(static_cast<unsigned>((n + kDqRows - 1) / kDqRows * batch * heads));
      relpos_attention_bwd_dq_kernel<scalar_t, kDimsPerLane><<<dq_grid, kThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), bias_ptr,
          out.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), lse.data_ptr<float>(), delta.data_ptr<float>(),
          dq.data_ptr<scalar_t>(), strides_of(q), strides_of(k), strides_of(v), strides_of(out),
          strides_of(grad_out), strides_of(dq), heads, n, head_dim, scale_f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 dkdv_grid(static_cast<unsigned>((n + kKeyRows - 1) / kKeyRows * batch * heads));
      relpos_attention_bwd_dkdv_kernel<scalar_t, kDimsPerLane><<<dkdv_grid, kThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), bias_ptr,
          grad_out.data_ptr<scalar_t>(), lse.data_ptr<float>(), delta.data_ptr<float>(), dk.data_ptr<scalar_t>(),
          dv.data_ptr<scalar_t>(), strides_of(q), strides_of(k), strides_of(v), strides_of(grad_out),
          strides_of(dk), strides_of(dv), heads, n, head_dim, scale_f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (need_dbias) {
      const unsigned tiles = static_cast<unsigned>((n + kTile - 1) / kTile);
      relpos_attention_bwd_dbias_kernel<scalar_t><<<dim3(tiles, tiles, static_cast<unsigned>(heads)), kBiasThreads,
                                                    0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), bias_ptr,
          grad_out.data_ptr<scalar_t>(), lse.data_ptr<float>(), delta.data_ptr<float>(), dbias.data_ptr<float>(),
          strides_of(q), strides_of(k), strides_of(v), strides_of(grad_out), batch, heads, n, head_dim, scale_f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dq, dk, dv, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(beitv2_cuda, m) {
  m.def("relpos_attention(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale) -> (Tensor, Tensor)");
  m.def(
      "relpos_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor out, "
      "Tensor lse, float scale, bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(beitv2_cuda, CUDA, m) {
  m.impl("relpos_attention", &relpos_attention);
  m.impl("relpos_attention_backward", &relpos_attention_backward);
}

}  // namespace beitv2_cuda
