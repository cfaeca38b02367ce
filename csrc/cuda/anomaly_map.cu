// CUDA implementation of the fused anomaly-map kernel and the image score (see cuda/kernels.h).
// The per-element math (distance, bilinear taps, reflect, fusion) comes from common/kd_math.h and
// the per-call setup from common/plan.h, both shared with the CPU path. Kernels:
//   1. distance_kernel: one thread per low-resolution position, coalesced channel loop;
//   2. fuse_hblur_kernel: one block per output row: upsample + fuse into shared memory (with the
//      reflect halo), then the horizontal Gaussian pass;
//   3. vblur_kernel: vertical Gaussian pass into the output;
//   4. score_kernel: one block per image: max, or mean of top-k via an exact radix select.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common/kd_math.h"
#include "common/plan.h"
#include "cuda/kernels.h"

namespace kd_ext {
namespace {

namespace km = kd_ext::math;

constexpr int kThreads = 256;
constexpr int kScoreThreads = 1024;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

// The per-scale part of the MapPlan as a kernel argument (fixed-size arrays, passed by value).
struct DeviceScales {
  int num_scales;
  int height[kMaxCudaScales];
  int width[kMaxCudaScales];
  int64_t offset[kMaxCudaScales];  // offset of the scale's low-res map inside one image's block
  float weight[kMaxCudaScales];
};

DeviceScales device_scales(const std::vector<ScaleView>& scales, const MapPlan& plan) {
  DeviceScales sc{};
  sc.num_scales = plan.num_scales;
  for (int k = 0; k < plan.num_scales; ++k) {
    sc.height[k] = static_cast<int>(scales[k].height);
    sc.width[k] = static_cast<int>(scales[k].width);
    sc.offset[k] = plan.dist_offset[k];
    sc.weight[k] = plan.weights[k];
  }
  return sc;
}

__global__ void distance_kernel(const float* __restrict__ teacher, const float* __restrict__ student,
                                int64_t batch, int64_t channels, int64_t hw, int distance, float* __restrict__ dist,
                                int64_t image_stride, int64_t scale_offset) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * hw) return;
  const int64_t b = idx / hw;
  const int64_t p = idx - b * hw;
  const float* t = teacher + b * channels * hw + p;
  const float* s = student + b * channels * hw + p;
  float dot = 0.0f, tt = 0.0f, ss = 0.0f;
  for (int64_t c = 0; c < channels; ++c) {
    const float a = __ldg(t + c * hw);
    const float v = __ldg(s + c * hw);
    dot = fmaf(a, v, dot);
    tt = fmaf(a, a, tt);
    ss = fmaf(v, v, ss);
  }
  dist[b * image_stride + scale_offset + p] = km::distance_from_moments(distance, dot, tt, ss);
}

__device__ float fused_value(const DeviceScales& sc, const float* __restrict__ dist_image, int y, int x, int out_h,
                             int out_w, bool align_corners, int fusion) {
  float acc = km::fuse_init(fusion);
  for (int k = 0; k < sc.num_scales; ++k) {
    const km::LinearTap ty = km::linear_tap(y, sc.height[k], out_h, align_corners);
    const km::LinearTap tx = km::linear_tap(x, sc.width[k], out_w, align_corners);
    const float* d = dist_image + sc.offset[k];
    const int w = sc.width[k];
    const float r0 = d[ty.i0 * w + tx.i0] * tx.l0 + d[ty.i0 * w + tx.i1] * tx.l1;
    const float r1 = d[ty.i1 * w + tx.i0] * tx.l0 + d[ty.i1 * w + tx.i1] * tx.l1;
    acc = km::fuse_step(fusion, acc, r0 * ty.l0 + r1 * ty.l1, sc.weight[k]);
  }
  return km::fuse_finish(fusion, acc, sc.num_scales);
}

// grid (out_h, batch); dynamic shared memory of out_w + 2 * radius floats.
__global__ void fuse_hblur_kernel(DeviceScales sc, const float* __restrict__ dist, int64_t image_stride, int out_h,
                                  int out_w, bool align_corners, int fusion, const float* __restrict__ taps,
                                  int radius, float* __restrict__ dst) {
  extern __shared__ float row[];
  const int y = blockIdx.x;
  const int64_t b = blockIdx.y;
  const float* dist_image = dist + b * image_stride;
  const int padded = out_w + 2 * radius;
  for (int i = threadIdx.x; i < padded; i += blockDim.x) {
    const int x = km::reflect_index(i - radius, out_w);
    row[i] = fused_value(sc, dist_image, y, x, out_h, out_w, align_corners, fusion);
  }
  __syncthreads();
  float* out_row = dst + (b * out_h + y) * out_w;
  for (int x = threadIdx.x; x < out_w; x += blockDim.x) {
    if (radius == 0) {
      out_row[x] = row[x];
      continue;
    }
    float acc = 0.0f;
    for (int j = 0; j <= 2 * radius; ++j) acc += taps[j] * row[x + j];
    out_row[x] = acc;
  }
}

__global__ void vblur_kernel(const float* __restrict__ src, int64_t batch, int out_h, int out_w,
                             const float* __restrict__ taps, int radius, float* __restrict__ dst) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t plane = static_cast<int64_t>(out_h) * out_w;
  if (idx >= batch * plane) return;
  const int64_t b = idx / plane;
  const int64_t rem = idx - b * plane;
  const int y = static_cast<int>(rem / out_w);
  const int x = static_cast<int>(rem - static_cast<int64_t>(y) * out_w);
  const float* image = src + b * plane;
  float acc = 0.0f;
  for (int j = 0; j <= 2 * radius; ++j) {
    const int sy = km::reflect_index(y - radius + j, out_h);
    acc += taps[j] * image[static_cast<int64_t>(sy) * out_w + x];
  }
  dst[idx] = acc;
}

__device__ unsigned block_sum_u32(unsigned v, unsigned* shared) {
  __syncthreads();
  if (threadIdx.x == 0) shared[0] = 0;
  __syncthreads();
  atomicAdd(shared, v);
  __syncthreads();
  return shared[0];
}

// grid (batch); block kScoreThreads. NaN anywhere in the map gives NaN.
__global__ void __launch_bounds__(kScoreThreads) score_kernel(const float* __restrict__ maps, int64_t hw, int score_mode, int64_t top_k,
                             float* __restrict__ scores) {
  __shared__ unsigned counter;
  __shared__ unsigned ushared[kScoreThreads];
  __shared__ double dshared[kScoreThreads];
  const float* map = maps + static_cast<int64_t>(blockIdx.x) * hw;
  // Max key and NaN count.
  unsigned nan_count = 0;
  unsigned max_key = 0;
  for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
    const float v = map[i];
    nan_count += (v != v);
    const unsigned key = km::float_to_ordered(__float_as_uint(v));
    max_key = key > max_key ? key : max_key;
  }
  if (block_sum_u32(nan_count, &counter) > 0) {
    if (threadIdx.x == 0) scores[blockIdx.x] = __int_as_float(0x7fc00000);
    return;
  }
  ushared[threadIdx.x] = max_key;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      const unsigned a = ushared[threadIdx.x];
      const unsigned c = ushared[threadIdx.x + stride];
      ushared[threadIdx.x] = a > c ? a : c;
    }
    __syncthreads();
  }
  const unsigned top_key = ushared[0];
  if (score_mode != km::kScoreTopK || top_k == 1) {
    if (threadIdx.x == 0) scores[blockIdx.x] = __uint_as_float(km::ordered_to_float(top_key));
    return;
  }
  // Radix select of the k-th largest key, most significant bit first.
  unsigned prefix = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const unsigned candidate = prefix | (1u << bit);
    unsigned count = 0;
    for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
      count += km::float_to_ordered(__float_as_uint(map[i])) >= candidate;
    }
    if (block_sum_u32(count, &counter) >= static_cast<unsigned>(top_k)) prefix = candidate;
  }
  const float kth = __uint_as_float(km::ordered_to_float(prefix));
  double sum = 0.0;
  unsigned greater = 0;
  for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
    const float v = map[i];
    if (km::float_to_ordered(__float_as_uint(v)) > prefix) {
      sum += v;
      ++greater;
    }
  }
  const unsigned total_greater = block_sum_u32(greater, &counter);
  dshared[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) dshared[threadIdx.x] += dshared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double total = dshared[0] + static_cast<double>(top_k - total_greater) * kth;
    scores[blockIdx.x] = static_cast<float>(total / static_cast<double>(top_k));
  }
}

// Makes `ptr`'s device current for the lifetime of the guard.
class DeviceGuard {
 public:
  explicit DeviceGuard(const void* ptr) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    const int device = cuda_pointer_device(ptr);
    if (device >= 0 && device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

int cuda_pointer_device(const void* ptr) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) return -1;
  return attr.device;
}

void anomaly_map_cuda(const std::vector<ScaleView>& scales, int64_t batch, const MapParams& params, float* out,
                      float* scores, void* stream_ptr) {
  DeviceGuard guard(out);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const MapPlan plan = make_plan(scales, params);
  const DeviceScales sc = device_scales(scales, plan);
  const int out_h = static_cast<int>(plan.height);
  const int out_w = static_cast<int>(plan.width);
  const int64_t plane = plan.plane;
  const bool blur = plan.blur;
  const int radius = plan.radius;
  const std::vector<float>& taps = plan.taps;
  const int64_t image_stride = plan.dist_offset[plan.num_scales];
  const size_t shared = static_cast<size_t>(out_w + 2 * radius) * sizeof(float);
  if (shared > 48 * 1024) {
    throw std::invalid_argument("output width too large for the CUDA kernel (row of " + std::to_string(out_w) +
                                " + blur halo exceeds 48 KiB of shared memory); use backend='reference' or a "
                                "smaller output width");
  }
  // Scratch (one stream-ordered allocation; failure raises OutOfMemory before any launch):
  // taps | distances [batch, image_stride] | horizontally blurred plane [batch, plane].
  const size_t taps_bytes = ((taps.size() * sizeof(float) + 255) / 256) * 256;
  const size_t dist_bytes = ((static_cast<size_t>(batch * image_stride) * sizeof(float) + 255) / 256) * 256;
  const size_t tmp_bytes = blur ? static_cast<size_t>(batch * plane) * sizeof(float) : 0;
  const size_t scratch_bytes = taps_bytes + dist_bytes + tmp_bytes;
  void* scratch = nullptr;
  const cudaError_t alloc = cudaMallocAsync(&scratch, scratch_bytes, stream);
  if (alloc == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // not sticky; clear it so the next call starts clean
    throw OutOfMemory(out_of_memory_message("the CUDA anomaly-map kernel", static_cast<int64_t>(scratch_bytes), batch,
                                            params.out_h, params.out_w));
  }
  check(alloc, "cudaMallocAsync");
  auto* taps_dev = static_cast<float*>(scratch);
  auto* dist = reinterpret_cast<float*>(static_cast<char*>(scratch) + taps_bytes);
  auto* tmp = reinterpret_cast<float*>(static_cast<char*>(scratch) + taps_bytes + dist_bytes);
  try {
    if (blur) {
      check(cudaMemcpyAsync(taps_dev, taps.data(), taps.size() * sizeof(float), cudaMemcpyHostToDevice, stream),
            "cudaMemcpyAsync");
    }
    for (int k = 0; k < plan.num_scales; ++k) {
      const int64_t hw = scales[k].height * scales[k].width;
      distance_kernel<<<blocks_for(batch * hw, kThreads), kThreads, 0, stream>>>(
          scales[k].teacher, scales[k].student, batch, scales[k].channels, hw, params.distance, dist, image_stride,
          sc.offset[k]);
      check(cudaGetLastError(), "distance_kernel");
    }
    const dim3 grid(static_cast<unsigned>(out_h), static_cast<unsigned>(batch));
    fuse_hblur_kernel<<<grid, kThreads, shared, stream>>>(sc, dist, image_stride, out_h, out_w, params.align_corners,
                                                          params.fusion, taps_dev, radius, blur ? tmp : out);
    check(cudaGetLastError(), "fuse_hblur_kernel");
    if (blur) {
      vblur_kernel<<<blocks_for(batch * plane, kThreads), kThreads, 0, stream>>>(tmp, batch, out_h, out_w, taps_dev,
                                                                                 radius, out);
      check(cudaGetLastError(), "vblur_kernel");
    }
    if (scores != nullptr && params.score_mode != km::kScoreNone) {
      score_kernel<<<static_cast<unsigned>(batch), kScoreThreads, 0, stream>>>(out, plane, params.score_mode,
                                                                               params.top_k, scores);
      check(cudaGetLastError(), "score_kernel");
    }
  } catch (...) {
    cudaFreeAsync(scratch, stream);
    throw;
  }
  check(cudaFreeAsync(scratch, stream), "cudaFreeAsync");
}

void image_score_cuda(const float* maps, int64_t batch, int64_t hw, int score_mode, int64_t top_k, float* scores,
                      void* stream_ptr) {
  DeviceGuard guard(maps);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  score_kernel<<<static_cast<unsigned>(batch), kScoreThreads, 0, stream>>>(maps, hw, score_mode, top_k, scores);
  check(cudaGetLastError(), "score_kernel");
}

}  // namespace kd_ext
