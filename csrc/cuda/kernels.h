// CUDA kernels: the fused anomaly map and the image score (built when CMake finds a CUDA toolkit).
//
// All pointers are device pointers; work is queued on `stream` (a cudaStream_t, 0 for the legacy
// default stream) on the device that owns the output. Throws std::runtime_error on CUDA errors and
// OutOfMemory when the device memory for the working buffers cannot be allocated.
#pragma once

#include <cstdint>
#include <vector>

#include "common/plan.h"

namespace kd_ext {

// Most scales one CUDA call takes (their tables travel as kernel arguments).
constexpr int kMaxCudaScales = 8;
// Most images one CUDA call takes (grid y dimension).
constexpr int64_t kMaxCudaBatch = 65535;

void anomaly_map_cuda(const std::vector<ScaleView>& scales, int64_t batch, const MapParams& params, float* out,
                      float* scores, void* stream);
void image_score_cuda(const float* maps, int64_t batch, int64_t hw, int score_mode, int64_t top_k, float* scores,
                      void* stream);
// Number of visible CUDA devices (0 when there is no driver/device; never throws).
int cuda_device_count();
// Device ordinal owning a device pointer, or -1 when the pointer is not CUDA device memory.
int cuda_pointer_device(const void* ptr);

}  // namespace kd_ext
