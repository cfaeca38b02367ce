// Gaussian smoothing taps shared by the CPU and CUDA paths.
#pragma once

#include <vector>

namespace kd_ext {

// Kernel radius for a given sigma: floor(4*sigma + 0.5), as anomalib's anomaly-map generators use.
int gaussian_radius(double sigma);

// Normalised 1-D Gaussian taps of length 2*radius+1. Throws std::invalid_argument for sigma <= 0.
std::vector<float> gaussian_kernel_1d(double sigma);

}  // namespace kd_ext
