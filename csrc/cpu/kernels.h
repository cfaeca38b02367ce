// CPU kernels: the fused anomaly map and the image score. Work is spread over the thread pool of
// cpu/parallel.h; all working memory is allocated before the threads start.
#pragma once

#include <cstdint>
#include <vector>

#include "common/plan.h"

namespace kd_ext {

// `out` is contiguous [batch, out_h, out_w]; `scores` is [batch] and written only when
// params.score_mode != kScoreNone. Arguments are checked by the caller. Throws OutOfMemory when the
// working memory cannot be allocated.
void anomaly_map_cpu(const std::vector<ScaleView>& scales, int64_t batch, const MapParams& params, float* out,
                     float* scores);

// Maximum of n floats, NaN when any of them is NaN.
float max_or_nan(const float* values, int64_t n);

// Image score of existing maps [batch, hw] (max or mean of the top_k largest); NaN propagates.
// Throws OutOfMemory when the top-k working copies cannot be allocated.
void image_score_cpu(const float* maps, int64_t batch, int64_t hw, int score_mode, int64_t top_k, float* scores);

}  // namespace kd_ext
