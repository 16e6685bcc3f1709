// Fused cosine codebook lookup, CUDA C++ version of kernels/codebook.py.
//
// For each row of z [M, D] the index of the code in codebook [K, D] with the largest dot product
// (ties: lowest index, as torch.argmax) and that score divided by |z| (when normalize_input).
// A block owns 64 rows; it streams the codebook through shared memory in tiles of 64 codes and
// 32 dims, each thread accumulating a 4 x 4 patch of scores in fp32 registers and keeping a
// running (max, argmax) for its 4 rows. The M x K score matrix never reaches global memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>

namespace beitv2_cuda {
namespace {

constexpr int kRows = 64;    // rows of z per block
constexpr int kCodes = 64;   // codes per shared-memory tile
constexpr int kChunk = 32;   // dimensions per shared-memory tile
constexpr int kLanes = 16;   // threads sharing a row group (they split the codes of a tile)
constexpr int kThreads = 256;
constexpr int kPerThread = 4;  // rows per thread and codes per thread within a tile
constexpr float kNormEps = 1e-12f;  // F.normalize's eps
static_assert(kRows == kCodes, "the tile loader fills z and code tiles with one loop");

// Keep (value, id) of the better candidate: larger value, or the lower id on a tie.
__device__ __forceinline__ void keep_better(float& value, int64_t& id, float other_value, int64_t other_id) {
  if (other_value > value || (other_value == value && other_id < id)) {
    value = other_value;
    id = other_id;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) codebook_argmax_kernel(
    const scalar_t* __restrict__ z, const scalar_t* __restrict__ codebook, int64_t* __restrict__ ids,
    float* __restrict__ similarity, int64_t rows, int64_t codes, int64_t dim, bool normalize_input) {
  __shared__ float z_tile[kChunk][kRows];
  __shared__ float code_tile[kChunk][kCodes];
  const int lane = threadIdx.x % kLanes;   // which codes of a tile: lane + kLanes * j
  const int group = threadIdx.x / kLanes;  // which rows of the block: group + kLanes * i
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;

  float best[kPerThread];
  int64_t best_id[kPerThread];
  for (int i = 0; i < kPerThread; ++i) {
    best[i] = -FLT_MAX;
    best_id[i] = 0;
  }

  for (int64_t k0 = 0; k0 < codes; k0 += kCodes) {
    float acc[kPerThread][kPerThread] = {};
    for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
      for (int idx = threadIdx.x; idx < kRows * kChunk; idx += kThreads) {
        const int r = idx / kChunk, d = idx % kChunk;
        const int64_t row = row0 + r, col = d0 + d;
        z_tile[d][r] = (row < rows && col < dim) ? static_cast<float>(z[row * dim + col]) : 0.f;
        const int64_t code = k0 + r;
        code_tile[d][r] = (code < codes && col < dim) ? static_cast<float>(codebook[code * dim + col]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int d = 0; d < kChunk; ++d) {
        float a[kPerThread], b[kPerThread];
        for (int i = 0; i < kPerThread; ++i) {
          a[i] = z_tile[d][group + kLanes * i];
          b[i] = code_tile[d][lane + kLanes * i];
        }
        for (int i = 0; i < kPerThread; ++i)
          for (int j = 0; j < kPerThread; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
    // Codes of this thread rise with j, so a strict '>' keeps the lowest index on ties.
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t code = k0 + lane + kLanes * j;
      if (code >= codes) continue;
      for (int i = 0; i < kPerThread; ++i) {
        if (acc[i][j] > best[i]) {
          best[i] = acc[i][j];
          best_id[i] = code;
        }
      }
    }
  }

  // Combine the 16 lanes that share a row group (they sit in one half-warp).
  for (int i = 0; i < kPerThread; ++i) {
    for (int offset = kLanes / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best[i], offset);
      const int64_t other_id = __shfl_xor_sync(0xffffffffu, best_id[i], offset);
      keep_better(best[i], best_id[i], other, other_id);
    }
  }
  if (lane != 0) return;
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t row = row0 + group + kLanes * i;
    if (row >= rows) continue;
    float score = best[i];
    if (normalize_input) {
      float sum_sq = 0.f;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = static_cast<float>(z[row * dim + d]);
        sum_sq = fmaf(v, v, sum_sq);
      }
      score /= fmaxf(sqrtf(sum_sq), kNormEps);
    }
    ids[row] = best_id[i];
    similarity[row] = score;
  }
}

std::tuple<at::Tensor, at::Tensor> codebook_lookup(const at::Tensor& z_in, const at::Tensor& codebook_in,
                                                   bool normalize_input) {
  TORCH_CHECK(z_in.is_cuda() && codebook_in.is_cuda(), "beitv2_cuda::codebook_lookup: z and codebook must be CUDA tensors");
  TORCH_CHECK(z_in.dim() == 2 && codebook_in.dim() == 2, "beitv2_cuda::codebook_lookup: z [M, D] and codebook [K, D] must be 2-D");
  TORCH_CHECK(z_in.size(1) == codebook_in.size(1), "beitv2_cuda::codebook_lookup: z and codebook must share D; got ",
              z_in.size(1), " and ", codebook_in.size(1));
  TORCH_CHECK(z_in.scalar_type() == codebook_in.scalar_type(), "beitv2_cuda::codebook_lookup: z and codebook must share a dtype");
  TORCH_CHECK(codebook_in.size(0) > 0, "beitv2_cuda::codebook_lookup: codebook must hold at least one code");
  const at::Tensor z = z_in.contiguous();
  const at::Tensor codebook = codebook_in.contiguous();
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t rows = z.size(0);
  at::Tensor ids = at::empty({rows}, z.options().dtype(at::kLong));
  at::Tensor similarity = at::empty({rows}, z.options().dtype(at::kFloat));
  if (rows == 0) return {ids, similarity};
  const dim3 grid(static_cast<unsigned>((rows + kRows - 1) / kRows));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "codebook_lookup", [&] {
    codebook_argmax_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        z.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), similarity.data_ptr<float>(),
        rows, codebook.size(0), z.size(1), normalize_input);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ids, similarity};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(beitv2_cuda, m) {
  m.def("codebook_lookup(Tensor z, Tensor codebook, bool normalize_input) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(beitv2_cuda, CUDA, m) { m.impl("codebook_lookup", &codebook_lookup); }

}  // namespace beitv2_cuda
