// Fused cosine codebook lookup on the tensor cores: CUDA C++ version of kernels/codebook.py.
//
// For each row of z [M, D] the index of the code in codebook [K, D] with the largest dot product
// (ties: lowest index; a NaN score wins and the first NaN's index is returned, as torch.argmax)
// and that score divided by |z| (when normalize_input). The M x K score matrix never reaches
// global memory.
//
// Layout. A block of W warps (W = 4, or 2 / 1 when a wide D leaves too little shared memory)
// owns 32 W rows of z: its tile is copied into shared memory once and reused against every code
// tile. The codebook streams through two shared-memory buffers of 64 codes (cp.async double
// buffering when rows are 16-byte aligned). Each warp multiplies its 32 rows by the 64 codes with
// mma.sync: m16n8k16 for bf16/fp16, and for fp32 three tf32 m16n8k8 products per tile
// (a = a_hi + a_lo split, a_hi b_hi + a_hi b_lo + a_lo b_hi), which keeps fp32-level accuracy so
// the argmax matches the fp32 reference (plain tf32 rounds products at 2^-11 and flips near-ties).
// Both shapes read the same 32-bit words of a fragment: word t and t + 4 of an 8-word step of
// row g (g = lane / 4, t = lane % 4), so one tile layout serves every dtype.
//
// Banks. Tiles are [row][word] with a row stride of 8j + 4 words: the 8 rows g of a fragment load
// start in banks 0, 12, 24, 4, ... (for j = 2: 20 g mod 32), distinct multiples of 4, and the
// 4 words t fill each group, so fragment loads are conflict-free; tile stores walk a row's words
// and are conflict-free too (the transposed z_tile[d][r] stores of the earlier kernel hit one
// bank 32 ways).
//
// Running max. Per tile each thread reduces its 16 scores per row with max.NaN (one instruction
// per score; NaN propagates) and only when that beats the running best does it look for the
// column (rare after the first tiles). Columns of a thread rise within a tile and tiles rise, so
// a strict '>' keeps the lowest index on ties; the 4 lanes sharing a row then combine with the
// same rule.
//
// ptxas (nvcc 13.0, -Xptxas -v) for sm_80 and sm_90 alike: bf16 and fp16 128 registers, fp32
// (3xTF32) 127; 0 bytes stack, 0 spills; only dynamic shared memory, (32 W + 128) x (8 steps + 4)
// words: 20 KB at D = 32 in bf16 (steps = ceil(D / 16) for 16-bit types, ceil(D / 8) for fp32).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace beitv2_cuda {
namespace {

constexpr int kRowsPerWarp = 32;  // two m16 tiles
constexpr int kMaxWarps = 4;
constexpr int kCodes = 64;        // codes per shared-memory tile: eight n8 tiles
constexpr int kNTiles = kCodes / 8;
constexpr int kStepWords = 8;     // 32-bit words per k step: 16 bf16/fp16 or 8 fp32 values
constexpr int kRowPadWords = 4;   // row stride 8j + 4 words: conflict-free fragment loads
constexpr int kNoCode = 0x7fffffff;
constexpr float kNormEps = 1e-12f;  // F.normalize's eps

template <typename scalar_t>
struct Elem {
  static constexpr int kPerWord = 4 / static_cast<int>(sizeof(scalar_t));
};

__host__ __device__ constexpr int row_stride_words(int steps) { return steps * kStepWords + kRowPadWords; }

// ---- tensor-core products on one 16 x 8 output tile ------------------------------------------
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_fp16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t y;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(y) : "f"(x));
  return y;
}

// x = hi + lo with both parts representable in tf32 (lo carries the next 11 bits).
__device__ __forceinline__ void split_tf32(uint32_t word, uint32_t& hi, uint32_t& lo) {
  const float x = __uint_as_float(word);
  hi = to_tf32(x);
  lo = to_tf32(x - __uint_as_float(hi));
}

template <typename scalar_t>
struct TileMma;

template <>
struct TileMma<at::BFloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_bf16(c, a, b);
  }
};

template <>
struct TileMma<at::Half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_fp16(c, a, b);
  }
};

template <>
struct TileMma<float> {
  // 3xTF32: the lo x lo term (2^-22 relative) is dropped.
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    uint32_t a_hi[4], a_lo[4], b_hi[2], b_lo[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) split_tf32(a[i], a_hi[i], a_lo[i]);
#pragma unroll
    for (int i = 0; i < 2; ++i) split_tf32(b[i], b_hi[i], b_lo[i]);
    mma_tf32(c, a_lo, b_hi);
    mma_tf32(c, a_hi, b_lo);
    mma_tf32(c, a_hi, b_hi);
  }
};

// ---- running (max, argmax) with torch.argmax's rules -----------------------------------------
__device__ __forceinline__ float max_nan(float a, float b) {
  float y;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(y) : "f"(a), "f"(b));
  return y;
}

// Does candidate (value, id) beat (best, best_id)? NaN beats numbers; among NaNs or equal numbers
// the lower id wins.
__device__ __forceinline__ bool beats(float value, int id, float best, int best_id) {
  const bool value_nan = isnan(value), best_nan = isnan(best);
  if (value_nan || best_nan) return value_nan && (!best_nan || id < best_id);
  return value > best || (value == best && id < best_id);
}

// ---- global -> shared tiles ------------------------------------------------------------------
__device__ __forceinline__ void cp_async_16(uint32_t* dst, const void* src, bool valid) {
  const unsigned dst_addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int src_bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_addr), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Rows [row0, row0 + tile_rows) of src [rows, dim] into tile [tile_rows][stride words]. Rows past
// `rows` are zero; the words past `dim` are zeroed once at kernel start (vector path) or written
// as zeros here (scalar path).
template <typename scalar_t>
__device__ __forceinline__ void load_tile(uint32_t* tile, const scalar_t* __restrict__ src, int64_t row0,
                                          int tile_rows, int64_t rows, int dim, int steps, bool vectorized) {
  constexpr int kPerWord = Elem<scalar_t>::kPerWord;
  const int stride = row_stride_words(steps);
  if (vectorized) {  // dim * sizeof(scalar_t) is a multiple of 16 and rows are 16-byte aligned
    const int chunks = dim * static_cast<int>(sizeof(scalar_t)) / 16;
    for (int idx = threadIdx.x; idx < tile_rows * chunks; idx += blockDim.x) {
      const int r = idx / chunks, chunk = idx % chunks;
      const int64_t row = row0 + r;
      const bool valid = row < rows;
      const scalar_t* from = src + (valid ? row : 0) * dim + chunk * (16 / sizeof(scalar_t));
      cp_async_16(tile + r * stride + chunk * 4, from, valid);
    }
    return;
  }
  const int words = steps * kStepWords;
  const uint16_t* half_bits = reinterpret_cast<const uint16_t*>(src);
  const uint32_t* word_bits = reinterpret_cast<const uint32_t*>(src);
  for (int idx = threadIdx.x; idx < tile_rows * words; idx += blockDim.x) {
    const int r = idx / words, w = idx % words;
    const int64_t row = row0 + r;
    uint32_t value = 0;
    if (row < rows) {
      if constexpr (kPerWord == 2) {
        const int d = 2 * w;
        const uint32_t lo = d < dim ? half_bits[row * dim + d] : 0u;
        const uint32_t hi = d + 1 < dim ? half_bits[row * dim + d + 1] : 0u;
        value = lo | (hi << 16);
      } else {
        value = w < dim ? word_bits[row * dim + w] : 0u;
      }
    }
    tile[r * stride + w] = value;
  }
}

template <typename scalar_t>
__device__ __forceinline__ float squared_norm_part(const uint32_t* row_words, int steps, int quad_lane) {
  float sum = 0.f;
  for (int w = quad_lane; w < steps * kStepWords; w += 4) {
    const uint32_t bits = row_words[w];
    if constexpr (Elem<scalar_t>::kPerWord == 2) {
      const scalar_t* pair = reinterpret_cast<const scalar_t*>(&bits);
      const float lo = static_cast<float>(pair[0]), hi = static_cast<float>(pair[1]);
      sum = fmaf(lo, lo, fmaf(hi, hi, sum));
    } else {
      const float x = __uint_as_float(bits);
      sum = fmaf(x, x, sum);
    }
  }
  return sum;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxWarps * 32) codebook_argmax_kernel(
    const scalar_t* __restrict__ z, const scalar_t* __restrict__ codebook, int64_t* __restrict__ ids,
    float* __restrict__ similarity, int64_t rows, int codes, int dim, int steps, bool vectorized,
    bool normalize_input) {
  extern __shared__ uint32_t smem[];
  const int stride = row_stride_words(steps);
  const int block_rows = kRowsPerWarp * (blockDim.x / 32);
  uint32_t* z_tile = smem;                                // [block_rows][stride]
  uint32_t* code_tiles = smem + block_rows * stride;      // [2][kCodes][stride]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * block_rows;

  if (vectorized) {  // the padding words past dim are never copied: zero them once
    const int total = (block_rows + 2 * kCodes) * stride;
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) smem[idx] = 0u;
    __syncthreads();
  }
  load_tile(z_tile, z, row0, block_rows, rows, dim, steps, vectorized);
  load_tile(code_tiles, codebook, 0, kCodes, codes, dim, steps, vectorized);
  cp_async_commit();

  // Rows of this thread: warp * 32 + 16 * mt + 8 * h + g, for mt, h in {0, 1}.
  float best[2][2];
  int best_id[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      best[mt][h] = -INFINITY;
      best_id[mt][h] = kNoCode;
    }

  const int code_tiles_count = (codes + kCodes - 1) / kCodes;
  const uint32_t* warp_rows = z_tile + warp * kRowsPerWarp * stride;
  for (int tile = 0; tile < code_tiles_count; ++tile) {
    if (tile + 1 < code_tiles_count) {
      load_tile(code_tiles + ((tile + 1) & 1) * kCodes * stride, codebook, static_cast<int64_t>(tile + 1) * kCodes,
                kCodes, codes, dim, steps, vectorized);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint32_t* code_tile = code_tiles + (tile & 1) * kCodes * stride;

    float acc[2][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
    for (int step = 0; step < steps; ++step) {
      const int w0 = step * kStepWords + t;
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const uint32_t* top = warp_rows + (16 * mt + g) * stride + w0;
        const uint32_t* bottom = top + 8 * stride;
        a[mt][0] = top[0];
        a[mt][1] = bottom[0];
        a[mt][2] = top[4];
        a[mt][3] = bottom[4];
      }
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        const uint32_t* code_row = code_tile + (8 * nt + g) * stride + w0;
        const uint32_t b[2] = {code_row[0], code_row[4]};
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) TileMma<scalar_t>::run(acc[mt][nt], a[mt], b);
      }
    }
    __syncthreads();  // every warp is done with this buffer before the next loads overwrite it

    const int code0 = tile * kCodes;
    const bool partial_tile = code0 + kCodes > codes;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Scores of columns code0 + 8 nt + 2 t + e in acc[mt][nt][2 h + e]: rising with (nt, e).
        if (partial_tile) {
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (code0 + 8 * nt + 2 * t + e >= codes) acc[mt][nt][2 * h + e] = -INFINITY;
        }
        float tile_max = acc[mt][0][2 * h];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) tile_max = max_nan(tile_max, acc[mt][nt][2 * h + e]);
        const bool tile_nan = isnan(tile_max);
        if (tile_max > best[mt][h] || (tile_nan && !isnan(best[mt][h]))) {
          int column = kNoCode;
#pragma unroll
          for (int nt = kNTiles - 1; nt >= 0; --nt)  // backwards: the last hit is the first column
#pragma unroll
            for (int e = 1; e >= 0; --e) {
              const float s = acc[mt][nt][2 * h + e];
              if (tile_nan ? isnan(s) : s == tile_max) column = 8 * nt + 2 * t + e;
            }
          best[mt][h] = tile_max;
          best_id[mt][h] = code0 + column;
        }
      }
  }

  // The 4 lanes t of a quad hold the same rows: combine, then lane t == 0 writes.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      for (int offset = 1; offset < 4; offset *= 2) {
        const float other = __shfl_xor_sync(0xffffffffu, best[mt][h], offset);
        const int other_id = __shfl_xor_sync(0xffffffffu, best_id[mt][h], offset);
        if (beats(other, other_id, best[mt][h], best_id[mt][h])) {
          best[mt][h] = other;
          best_id[mt][h] = other_id;
        }
      }
      const int local_row = warp * kRowsPerWarp + 16 * mt + 8 * h + g;
      float norm = 1.f;
      if (normalize_input) {
        float sum_sq = squared_norm_part<scalar_t>(z_tile + local_row * stride, steps, t);
        sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, 1);
        sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, 2);
        norm = fmaxf(sqrtf(sum_sq), kNormEps);
      }
      const int64_t row = row0 + local_row;
      if (t == 0 && row < rows) {
        // kNoCode: every score was -inf; torch.argmax then returns the first index.
        ids[row] = best_id[mt][h] == kNoCode ? 0 : best_id[mt][h];
        similarity[row] = best[mt][h] / norm;
      }
    }
}

template <typename scalar_t>
void launch_codebook_argmax(const at::Tensor& z, const at::Tensor& codebook, at::Tensor& ids, at::Tensor& similarity,
                            bool normalize_input) {
  constexpr int kPerWord = Elem<scalar_t>::kPerWord;
  const int64_t rows = z.size(0);
  const int dim = static_cast<int>(z.size(1));
  const int steps = (dim + kPerWord * kStepWords - 1) / (kPerWord * kStepWords);
  const int stride = row_stride_words(steps);
  const bool vectorized = (dim * sizeof(scalar_t)) % 16 == 0 && reinterpret_cast<uintptr_t>(z.data_ptr()) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(codebook.data_ptr()) % 16 == 0;
  int device_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&device_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, z.get_device()));
  // The widest block whose z tile and two code tiles fit (D = 256 in fp32 needs 2 warps on an A100).
  int warps = kMaxWarps;
  auto smem_bytes = [&](int w) { return static_cast<size_t>(w * kRowsPerWarp + 2 * kCodes) * stride * 4; };
  while (warps > 1 && smem_bytes(warps) > static_cast<size_t>(device_limit)) warps /= 2;
  const size_t bytes = smem_bytes(warps);
  TORCH_CHECK(bytes <= static_cast<size_t>(device_limit), "beitv2_cuda::codebook_lookup: D = ", dim,
              " needs ", bytes, " bytes of shared memory; the device allows ", device_limit);
  auto kernel = codebook_argmax_kernel<scalar_t>;
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  const int block_rows = warps * kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((rows + block_rows - 1) / block_rows));
  kernel<<<grid, warps * 32, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      z.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), similarity.data_ptr<float>(),
      rows, static_cast<int>(codebook.size(0)), dim, steps, vectorized, normalize_input);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> codebook_lookup(const at::Tensor& z_in, const at::Tensor& codebook_in,
                                                   bool normalize_input) {
  TORCH_CHECK(z_in.is_cuda() && codebook_in.is_cuda(), "beitv2_cuda::codebook_lookup: z and codebook must be CUDA tensors");
  TORCH_CHECK(z_in.dim() == 2 && codebook_in.dim() == 2, "beitv2_cuda::codebook_lookup: z [M, D] and codebook [K, D] must be 2-D");
  TORCH_CHECK(z_in.size(1) == codebook_in.size(1), "beitv2_cuda::codebook_lookup: z and codebook must share D; got ",
              z_in.size(1), " and ", codebook_in.size(1));
  TORCH_CHECK(z_in.scalar_type() == codebook_in.scalar_type(), "beitv2_cuda::codebook_lookup: z and codebook must share a dtype");
  TORCH_CHECK(codebook_in.size(0) > 0 && codebook_in.size(0) < kNoCode,
              "beitv2_cuda::codebook_lookup: codebook must hold between 1 and 2^31 - 2 codes");
  const at::Tensor z = z_in.contiguous();
  const at::Tensor codebook = codebook_in.contiguous();
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor ids = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  at::Tensor similarity = at::empty({z.size(0)}, z.options().dtype(at::kFloat));
  if (z.size(0) == 0) return {ids, similarity};
  switch (z.scalar_type()) {
    case at::kBFloat16:
      launch_codebook_argmax<at::BFloat16>(z, codebook, ids, similarity, normalize_input);
      break;
    case at::kHalf:
      launch_codebook_argmax<at::Half>(z, codebook, ids, similarity, normalize_input);
      break;
    case at::kFloat:
      launch_codebook_argmax<float>(z, codebook, ids, similarity, normalize_input);
      break;
    default:
      TORCH_CHECK(false, "beitv2_cuda::codebook_lookup: z must be float32, bfloat16 or float16; got ", z.scalar_type());
  }
  return {ids, similarity};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(beitv2_cuda, m) {
  m.def("codebook_lookup(Tensor z, Tensor codebook, bool normalize_input) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(beitv2_cuda, CUDA, m) { m.impl("codebook_lookup", &codebook_lookup); }

}  // namespace beitv2_cuda
