// Gaussian smoothing taps shared by the CPU and CUDA kernels.
#pragma once

#include <vector>

namespace kd_ext {

// Bound on the radius gaussian_kernel_1d builds: a map's smaller side is below 2^15 under the
// pixel cap (H * W < 2^30), and the radius must be smaller than that side.
constexpr int kMaxGaussianRadius = 1 << 15;

// Kernel radius for a given sigma: floor(4*sigma + 0.5), as anomalib's anomaly-map generators use
// (and kd_ext/kernels/_options.py's gaussian_radius; the tests check that they agree). Saturates at
// INT_MAX for huge sigma and gives 0 for sigma <= 0 or NaN.
int gaussian_radius(double sigma);

// Normalised 1-D Gaussian taps of length 2*radius+1. Throws std::invalid_argument for sigma <= 0,
// non-finite sigma or a radius of kMaxGaussianRadius or more.
std::vector<float> gaussian_kernel_1d(double sigma);

}  // namespace kd_ext
