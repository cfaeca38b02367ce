// Shared by the CPU and CUDA anomaly-map kernels: the inputs of one call (ScaleView, MapParams),
// the per-call setup both backends derive from them (MapPlan), and the out-of-memory error.
//
// The option rules (names, sigma, weights, top_k) are applied in Python (kd_ext/kernels/_options.py)
// before a call reaches C++; the binding checks only what memory safety needs, so MapParams is
// trusted here.
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

// What does not change across the images of one call, for either backend.
struct MapPlan {
  int num_scales = 0;
  int64_t height = 0;  // output map
  int64_t width = 0;
  int64_t plane = 0;   // height * width
  bool blur = false;
  int radius = 0;            // Gaussian radius (0 without blur)
  std::vector<float> taps;   // 2 * radius + 1 normalised taps (empty without blur)
  // Start of each scale's low-resolution distance map inside one image's block of distances;
  // dist_offset[num_scales] is the size of that block.
  std::vector<int64_t> dist_offset;
  std::vector<float> weights;  // per-scale fusion factor: params.weights for kWeighted, else 1
  int64_t max_low_width = 1;   // widest feature map
};

// Builds the plan of one call (allocates the taps and the per-scale tables).
MapPlan make_plan(const std::vector<ScaleView>& scales, const MapParams& params);

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

}  // namespace kd_ext
