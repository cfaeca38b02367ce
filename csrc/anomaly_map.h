// Fused teacher/student anomaly-map kernel: per-scale distance at low resolution, bilinear
// upsampling + fusion row by row, separable Gaussian blur (reflect), optional image score.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace kd_ext {

// One feature scale: teacher and student are contiguous float32 [batch, channels, height, width].
struct ScaleView {
  const float* teacher;
  const float* student;
  int64_t channels;
  int64_t height;
  int64_t width;
};

struct MapParams {
  int distance = 0;            // math::Distance
  int fusion = 0;              // math::Fusion
  std::vector<float> weights;  // per-scale weights, used when fusion == kWeighted
  bool align_corners = false;
  double sigma = 0.0;          // 0 = no smoothing
  int64_t out_h = 0;
  int64_t out_w = 0;
  int score_mode = 0;          // math::ScoreMode
  int64_t top_k = 0;           // for kScoreTopK
};

// A kernel could not allocate its working memory; what() names the sizes and the fix. The
// bindings turn it into Python's MemoryError.
class OutOfMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The OutOfMemory message for `what` (e.g. "the CPU anomaly-map kernel"): output and working
// memory of a batch of out_h x out_w maps, and the fix (smaller batch or output size).
std::string out_of_memory_message(const char* what, int64_t workspace_bytes, int64_t batch, int64_t out_h,
                                  int64_t out_w);

// CPU implementation. `out` is contiguous [batch, out_h, out_w]; `scores` is [batch] and written
// only when params.score_mode != kScoreNone. Arguments are validated by the caller. All working
// memory is allocated before the threads start; throws OutOfMemory when it cannot be.
void anomaly_map_cpu(const std::vector<ScaleView>& scales, int64_t batch, const MapParams& params, float* out,
                     float* scores);

// Maximum of n floats, NaN when any of them is NaN.
float max_or_nan(const float* values, int64_t n);

// Image score of existing maps [batch, hw] (max or mean of the top_k largest); NaN propagates.
// Throws OutOfMemory when the top-k working copies cannot be allocated.
void image_score_cpu(const float* maps, int64_t batch, int64_t hw, int score_mode, int64_t top_k, float* scores);

#ifdef KD_EXT_WITH_CUDA
// CUDA implementation: all pointers are device pointers on the current device; work is queued on
// `stream` (a cudaStream_t, 0 for the legacy default stream). Throws std::runtime_error on CUDA
// errors and OutOfMemory when the device memory for its working buffers cannot be allocated. At
// most kMaxCudaScales scales.
constexpr int kMaxCudaScales = 8;
void anomaly_map_cuda(const std::vector<ScaleView>& scales, int64_t batch, const MapParams& params, float* out,
                      float* scores, void* stream);
void image_score_cuda(const float* maps, int64_t batch, int64_t hw, int score_mode, int64_t top_k, float* scores,
                      void* stream);
// Number of visible CUDA devices (0 when there is no driver/device; never throws).
int cuda_device_count();
// Device ordinal owning a device pointer, or -1 when the pointer is not CUDA device memory.
int cuda_pointer_device(const void* ptr);
#endif

}  // namespace kd_ext
