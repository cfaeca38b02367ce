// CPU implementation of the fused anomaly-map kernel (see cpu/kernels.h).
//
// Per image (threads from the pool of cpu/parallel.h, see there why not OpenMP's fork-join):
//   A. per-scale distance at the feature resolution, tasks = (scale, block of positions); the
//      channel reduction streams contiguous rows of each channel plane (vectorised over positions);
//   B. per output row: bilinear upsampling of every low-resolution distance map + fusion, then the
//      horizontal Gaussian pass (reflect) into a per-image scratch plane (cache resident);
//   C. per output row: vertical Gaussian pass into the output, with the row maximum for the score.
// Without smoothing (sigma == 0) phase B writes the fused rows straight into the output.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "common/kd_math.h"
#include "common/plan.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

namespace kd_ext {
namespace {

using math::LinearTap;

// The hot loops get an AVX2/FMA clone next to the baseline one (picked at load time by the CPU),
// so the wheel stays portable (-O3, no -march=native) and still uses 256-bit vectors where present.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define KD_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KD_MULTIVERSION
#endif

constexpr int64_t kBlock = 2048;  // positions per distance task (3 accumulators of 8 KiB, L1 resident)
constexpr int64_t kImagesPerThread = 4;  // batch >= this * threads: parallel over whole images
constexpr int64_t kRowChunk = 8;            // output rows per dynamic chunk when splitting one image

struct DistTask {
  int scale;
  int64_t p0;
  int64_t n;
};

// Distances for positions [p0, p0 + n) of one image and scale; t, s point at the image's [C, hw].
KD_MULTIVERSION void distance_block(const float* __restrict t, const float* __restrict s, int64_t channels, int64_t hw, int64_t p0,
                    int64_t n, int distance, float* __restrict out) {
  alignas(64) float dot[kBlock];
  alignas(64) float tt[kBlock];
  alignas(64) float ss[kBlock];
  for (int64_t i = 0; i < n; ++i) {
    dot[i] = 0.0f;
    tt[i] = 0.0f;
    ss[i] = 0.0f;
  }
  int64_t c = 0;
  for (; c + 3 < channels; c += 4) {
    const float* __restrict t0 = t + c * hw + p0;
    const float* __restrict t1 = t0 + hw;
    const float* __restrict t2 = t1 + hw;
    const float* __restrict t3 = t2 + hw;
    const float* __restrict s0 = s + c * hw + p0;
    const float* __restrict s1 = s0 + hw;
    const float* __restrict s2 = s1 + hw;
    const float* __restrict s3 = s2 + hw;
    for (int64_t i = 0; i < n; ++i) {
      const float a0 = t0[i], a1 = t1[i], a2 = t2[i], a3 = t3[i];
      const float b0 = s0[i], b1 = s1[i], b2 = s2[i], b3 = s3[i];
      dot[i] += (a0 * b0 + a1 * b1) + (a2 * b2 + a3 * b3);
      tt[i] += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3);
      ss[i] += (b0 * b0 + b1 * b1) + (b2 * b2 + b3 * b3);
    }
  }
  for (; c < channels; ++c) {
    const float* __restrict tc = t + c * hw + p0;
    const float* __restrict sc = s + c * hw + p0;
    for (int64_t i = 0; i < n; ++i) {
      const float a = tc[i], b = sc[i];
      dot[i] += a * b;
      tt[i] += a * a;
      ss[i] += b * b;
    }
  }
  for (int64_t i = 0; i < n; ++i) out[i] = math::distance_from_moments(distance, dot[i], tt[i], ss[i]);
}

struct AxisTaps {
  std::vector<int> i0, i1;
  std::vector<float> l0, l1;
  void build(int64_t out_size, int64_t in_size, bool align_corners) {
    i0.resize(out_size);
    i1.resize(out_size);
    l0.resize(out_size);
    l1.resize(out_size);
    for (int64_t d = 0; d < out_size; ++d) {
      const LinearTap tap =
          math::linear_tap(static_cast<int>(d), static_cast<int>(in_size), static_cast<int>(out_size), align_corners);
      i0[d] = tap.i0;
      i1[d] = tap.i1;
      l0[d] = tap.l0;
      l1[d] = tap.l1;
    }
  }
};

// dst[x] = sum_j taps[j] * padded[x + j]: horizontal pass over a reflect-padded row.
KD_MULTIVERSION void hblur_row(const float* __restrict padded, const float* __restrict taps, int num_taps,
                               int64_t width, float* __restrict dst) {
  for (int64_t x = 0; x < width; ++x) dst[x] = 0.0f;
  for (int j = 0; j < num_taps; ++j) {
    const float g = taps[j];
    const float* __restrict src = padded + j;
    for (int64_t x = 0; x < width; ++x) dst[x] += g * src[x];
  }
}

// dst[x] = sum_j taps[j] * plane[reflect(y - r + j)][x]: vertical pass for output row y.
KD_MULTIVERSION void vblur_row(const float* __restrict plane, int64_t height, int64_t width, int64_t y,
                               const float* __restrict taps, int radius, float* __restrict dst) {
  for (int64_t x = 0; x < width; ++x) dst[x] = 0.0f;
  for (int j = 0; j <= 2 * radius; ++j) {
    const float g = taps[j];
    const int64_t sy = math::reflect_index(static_cast<int>(y) - radius + j, static_cast<int>(height));
    const float* __restrict src = plane + sy * width;
    for (int64_t x = 0; x < width; ++x) dst[x] += g * src[x];
  }
}

// Everything that does not change across images of one call: the shared plan (common/plan.h)
// plus the CPU's bilinear tap tables and distance tasks.
struct Plan : MapPlan {
  explicit Plan(MapPlan base) : MapPlan(std::move(base)) {}
  const std::vector<ScaleView>* scales = nullptr;
  const MapParams* params = nullptr;
  std::vector<AxisTaps> xtaps, ytaps;
  std::vector<DistTask> tasks;
  bool want_max = false;
};

// A float buffer that is not zero-filled: pages are only committed when a thread writes them.
using Buffer = std::unique_ptr<float[]>;

Buffer allocate(int64_t n) { return Buffer(new float[static_cast<size_t>(std::max<int64_t>(n, 1))]); }

// Per-thread work buffers: the padded row and one interpolated low-resolution row.
struct RowBuffers {
  Buffer padded, lowrow;
  static int64_t floats(const Plan& plan) { return plan.width + 2 * plan.radius + plan.max_low_width; }
  explicit RowBuffers(const Plan& plan)
      : padded(allocate(plan.width + 2 * plan.radius)), lowrow(allocate(plan.max_low_width)) {}
};

// Per-image work buffers: the low-resolution distances, the horizontally blurred plane and the
// row maxima.
struct ImageBuffers {
  Buffer dist, scratch, rmax;
  static int64_t floats(const Plan& plan) {
    return plan.dist_offset[plan.num_scales] + (plan.blur ? plan.plane : 0) + plan.height;
  }
  explicit ImageBuffers(const Plan& plan)
      : dist(allocate(plan.dist_offset[plan.num_scales])),
        scratch(allocate(plan.blur ? plan.plane : 0)),
        rmax(allocate(plan.height)) {}
};

void run_distance_task(const Plan& plan, int64_t b, int64_t ti, float* dist) {
  const DistTask& task = plan.tasks[ti];
  const ScaleView& sv = (*plan.scales)[task.scale];
  const int64_t hw = sv.height * sv.width;
  const int64_t image_offset = b * sv.channels * hw;
  distance_block(sv.teacher + image_offset, sv.student + image_offset, sv.channels, hw, task.p0, task.n,
                 plan.params->distance, dist + plan.dist_offset[task.scale] + task.p0);
}

// Phase B for output row y: upsample + fuse, then the horizontal blur into `scratch` (or, without
// blur, straight into the output row). Returns the row max when it wrote the output row.
void fuse_row(const Plan& plan, int64_t y, const float* dist, RowBuffers& buf, float* scratch, float* out_image,
              float* rmax) {
  const int fusion = plan.params->fusion;
  const int64_t width = plan.width;
  float* acc = buf.padded.get() + plan.radius;
  const float init = math::fuse_init(fusion);
  for (int64_t x = 0; x < width; ++x) acc[x] = init;
  for (int k = 0; k < plan.num_scales; ++k) {
    const ScaleView& sv = (*plan.scales)[k];
    const AxisTaps& ty = plan.ytaps[k];
    const AxisTaps& tx = plan.xtaps[k];
    const float* d = dist + plan.dist_offset[k];
    const float* r0 = d + static_cast<int64_t>(ty.i0[y]) * sv.width;
    const float* r1 = d + static_cast<int64_t>(ty.i1[y]) * sv.width;
    const float wy0 = ty.l0[y], wy1 = ty.l1[y];
    float* low = buf.lowrow.get();
    for (int64_t j = 0; j < sv.width; ++j) low[j] = r0[j] * wy0 + r1[j] * wy1;
    const float weight = plan.weights[k];
    const int* xi0 = tx.i0.data();
    const int* xi1 = tx.i1.data();
    const float* xl0 = tx.l0.data();
    const float* xl1 = tx.l1.data();
    for (int64_t x = 0; x < width; ++x) {
      const float v = low[xi0[x]] * xl0[x] + low[xi1[x]] * xl1[x];
      acc[x] = math::fuse_step(fusion, acc[x], v, weight);
    }
  }
  if (fusion == math::kMean) {
    for (int64_t x = 0; x < width; ++x) acc[x] = math::fuse_finish(fusion, acc[x], plan.num_scales);
  }
  if (!plan.blur) {
    float* dst = out_image + y * width;
    std::memcpy(dst, acc, sizeof(float) * width);
    if (plan.want_max) rmax[y] = max_or_nan(dst, width);
    return;
  }
  for (int j = 1; j <= plan.radius; ++j) {
    acc[-j] = acc[j];
    acc[width - 1 + j] = acc[width - 1 - j];
  }
  hblur_row(buf.padded.get(), plan.taps.data(), 2 * plan.radius + 1, width, scratch + y * width);
}

// Phase C for output row y.
void blur_row(const Plan& plan, int64_t y, const float* scratch, float* out_image, float* rmax) {
  float* dst = out_image + y * plan.width;
  vblur_row(scratch, plan.height, plan.width, y, plan.taps.data(), plan.radius, dst);
  if (plan.want_max) rmax[y] = max_or_nan(dst, plan.width);
}

// The kernel proper; throws std::bad_alloc when the working memory cannot be allocated (always
// before any thread starts on the images).
void run_anomaly_map(const std::vector<ScaleView>& scales, int64_t batch, const MapParams& params, float* out,
                     float* scores, int64_t* workspace_bytes) {
  Plan plan(make_plan(scales, params));
  plan.scales = &scales;
  plan.params = &params;
  plan.want_max = scores != nullptr && params.score_mode == math::kScoreMax;
  const int threads = max_threads();
  // Enough images: one whole image per claim and per-worker image buffers; otherwise each image
  // is split over the threads and shares one set of image buffers.
  const bool whole_images = batch >= kImagesPerThread * threads || threads == 1;
  const int image_sets = whole_images ? threads : 1;
  *workspace_bytes = static_cast<int64_t>(sizeof(float)) *
                     (threads * RowBuffers::floats(plan) + image_sets * ImageBuffers::floats(plan) +
                      4 * static_cast<int64_t>(plan.num_scales) * (plan.height + plan.width));  // AxisTaps

  // All working memory is allocated here, before the parallel sections.
  plan.xtaps.resize(plan.num_scales);
  plan.ytaps.resize(plan.num_scales);
  for (int k = 0; k < plan.num_scales; ++k) {
    const ScaleView& sv = scales[k];
    plan.xtaps[k].build(plan.width, sv.width, params.align_corners);
    plan.ytaps[k].build(plan.height, sv.height, params.align_corners);
    const int64_t hw = sv.height * sv.width;
    for (int64_t p0 = 0; p0 < hw; p0 += kBlock) plan.tasks.push_back({k, p0, std::min(kBlock, hw - p0)});
  }
  const int64_t num_tasks = static_cast<int64_t>(plan.tasks.size());
  std::vector<RowBuffers> bufs;  // per worker (parallel_for hands each running thread its own id)
  bufs.reserve(threads);
  for (int w = 0; w < threads; ++w) bufs.emplace_back(plan);
  std::vector<ImageBuffers> images;
  images.reserve(image_sets);
  for (int w = 0; w < image_sets; ++w) images.emplace_back(plan);

  if (whole_images) {
    // No synchronisation inside an image; per-worker distance and scratch planes stay cache resident.
    parallel_for(batch, [&](int64_t b, int w) {
      float* dist = images[w].dist.get();
      float* scratch = images[w].scratch.get();
      float* rmax = images[w].rmax.get();
      float* out_image = out + b * plan.plane;
      for (int64_t ti = 0; ti < num_tasks; ++ti) run_distance_task(plan, b, ti, dist);
      for (int64_t y = 0; y < plan.height; ++y) fuse_row(plan, y, dist, bufs[w], scratch, out_image, rmax);
      if (plan.blur) {
        for (int64_t y = 0; y < plan.height; ++y) blur_row(plan, y, scratch, out_image, rmax);
      }
      if (plan.want_max) scores[b] = max_or_nan(rmax, plan.height);
    });
  } else {
    // Few images: split each image over the threads (distance tasks, then row chunks, then row
    // chunks); each stage waits only for chunks already claimed.
    float* dist = images[0].dist.get();
    float* scratch = images[0].scratch.get();
    float* rmax = images[0].rmax.get();
    const int64_t row_chunks = (plan.height + kRowChunk - 1) / kRowChunk;
    for (int64_t b = 0; b < batch; ++b) {
      float* out_image = out + b * plan.plane;
      parallel_for(num_tasks, [&](int64_t ti, int) { run_distance_task(plan, b, ti, dist); });
      parallel_for(row_chunks, [&](int64_t chunk, int w) {
        const int64_t end = std::min(plan.height, (chunk + 1) * kRowChunk);
        for (int64_t y = chunk * kRowChunk; y < end; ++y) {
          fuse_row(plan, y, dist, bufs[w], scratch, out_image, rmax);
        }
      });
      if (plan.blur) {
        parallel_for(row_chunks, [&](int64_t chunk, int) {
          const int64_t end = std::min(plan.height, (chunk + 1) * kRowChunk);
          for (int64_t y = chunk * kRowChunk; y < end; ++y) blur_row(plan, y, scratch, out_image, rmax);
        });
      }
      if (plan.want_max) scores[b] = max_or_nan(rmax, plan.height);
    }
  }
  if (scores != nullptr && params.score_mode == math::kScoreTopK) {
    image_score_cpu(out, batch, plan.plane, params.score_mode, params.top_k, scores);
  }
}

}  // namespace

void anomaly_map_cpu(const std::vector<ScaleView>& scales, int64_t batch, const MapParams& params, float* out,
                     float* scores) {
  int64_t workspace_bytes = 0;
  try {
    run_anomaly_map(scales, batch, params, out, scores, &workspace_bytes);
  } catch (const std::bad_alloc&) {
    throw OutOfMemory(out_of_memory_message("the CPU anomaly-map kernel", workspace_bytes, batch, params.out_h,
                                            params.out_w));
  }
}

}  // namespace kd_ext
