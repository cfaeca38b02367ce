// Python bindings of the kd_ext native module: argument conversion and thin CPU/CUDA launchers.
//
// Torch-free: CPU inputs arrive through the buffer protocol (numpy arrays; a torch CPU tensor's
// .numpy() view is zero-copy), CUDA inputs through __cuda_array_interface__ (torch, cupy, numba).
// The option rules live in kd_ext/kernels/_options.py (KernelOptions) and run before a call gets
// here. This layer checks only what its memory safety needs: array types, dtypes, layouts and
// shapes, the option names it maps to enums, the pixel cap (MAX_MAP_PIXELS), a blur radius below
// the map size, top_k within the map and one weight per scale, so that a direct call raises
// ValueError/TypeError and never crashes. Out of memory raises MemoryError naming the sizes and
// the fix.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <initializer_list>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/gaussian.h"
#include "common/kd_math.h"
#include "common/plan.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"
#ifdef KD_EXT_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace py = pybind11;

namespace {

constexpr int64_t kMaxDim = int64_t{1} << 30;  // keeps every index/offset computation in range

py::dict build_info() {
  py::dict info;
#ifdef KD_EXT_WITH_OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef KD_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_devices"] = kd_ext::cuda_device_count();
#else
  info["cuda"] = false;
  info["cuda_devices"] = 0;
#endif
  info["threads"] = kd_ext::max_threads();
  return info;
}

py::array_t<float> gaussian_kernel_1d_py(double sigma) {
  const std::vector<float> taps = kd_ext::gaussian_kernel_1d(sigma);
  py::array_t<float> out(static_cast<py::ssize_t>(taps.size()));
  std::copy(taps.begin(), taps.end(), out.mutable_data());
  return out;
}

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

// Option names -> enums of common/kd_math.h (the names are the values of kd_ext.kernels' Enums).
int parse_name(const std::string& name, const char* what,
               std::initializer_list<std::pair<const char*, int>> names) {
  std::string known;
  for (const auto& [key, value] : names) {
    if (name == key) return value;
    known += (known.empty() ? "'" : ", '") + std::string(key) + "'";
  }
  value_error(std::string(what) + " must be one of " + known + ", got '" + name + "'");
}

int parse_distance(const std::string& name) {
  return parse_name(name, "distance", {{"cosine", kd_ext::math::kCosine}, {"l2", kd_ext::math::kL2}});
}

int parse_fusion(const std::string& name) {
  return parse_name(name, "fusion",
                    {{"sum", kd_ext::math::kSum},
                     {"mean", kd_ext::math::kMean},
                     {"product", kd_ext::math::kProduct},
                     {"weighted", kd_ext::math::kWeighted}});
}

int parse_score(const std::string& name) {
  return parse_name(name, "score mode",
                    {{"none", kd_ext::math::kScoreNone}, {"max", kd_ext::math::kScoreMax}, {"topk", kd_ext::math::kScoreTopK}});
}

std::vector<py::object> as_list(const py::object& obj, const char* name) {
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj)) {
    type_error(std::string(name) + " must be a list or tuple of [B, C, H, W] float32 arrays, got " +
               std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  std::vector<py::object> items;
  for (py::handle item : obj) items.push_back(py::reinterpret_borrow<py::object>(item));
  return items;
}

// A validated, contiguous float32 array view (CPU buffer or CUDA array interface).
struct ArrayView {
  const float* data = nullptr;
  std::vector<int64_t> shape;
};

void check_shape(const std::vector<int64_t>& shape, const std::string& what) {
  for (int64_t d : shape) {
    if (d <= 0) value_error(what + " has an empty dimension, shape " + shape_str(shape) + "; pass non-empty arrays");
    if (d >= kMaxDim) value_error(what + " is too large, shape " + shape_str(shape));
  }
}

ArrayView view_buffer(const py::object& obj, const std::string& what, size_t ndim, std::vector<py::buffer_info>& keep) {
  if (!py::isinstance<py::buffer>(obj)) {
    type_error(what + " must be a float32 numpy array (or buffer), got " +
               std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request();
  if (info.itemsize != static_cast<py::ssize_t>(sizeof(float)) || info.format != py::format_descriptor<float>::format()) {
    type_error(what + " must have dtype float32, got buffer format '" + info.format +
               "'; convert with .astype(numpy.float32) or tensor.float()");
  }
  if (static_cast<size_t>(info.ndim) != ndim) {
    value_error(what + " must be " + std::to_string(ndim) + "-D, got " + std::to_string(info.ndim) + "-D");
  }
  ArrayView view;
  view.shape.assign(info.shape.begin(), info.shape.end());
  check_shape(view.shape, what);
  py::ssize_t expected = info.itemsize;
  for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
    if (info.shape[i] != 1 && info.strides[i] != expected) {
      value_error(what + " must be C-contiguous (got strides that are not row-major, e.g. a transposed, sliced or "
                         "channels-last array); make it contiguous with numpy.ascontiguousarray() or "
                         "tensor.contiguous()");
    }
    expected *= info.shape[i];
  }
  view.data = static_cast<const float*>(info.ptr);
  keep.push_back(std::move(info));
  return view;
}

#ifdef KD_EXT_WITH_CUDA
ArrayView view_cuda(const py::object& obj, const std::string& what, size_t ndim, int* device) {
  if (!py::hasattr(obj, "__cuda_array_interface__")) {
    type_error(what + " must be a CUDA array (with __cuda_array_interface__), got " +
               std::string(py::str(py::type::handle_of(obj).attr("__name__"))) +
               "; do not mix CPU and CUDA inputs");
  }
  py::dict cai = obj.attr("__cuda_array_interface__");
  const std::string typestr = py::str(cai["typestr"]);
  if (typestr != "<f4") {
    type_error(what + " must have dtype float32, got typestr '" + typestr + "'; convert with tensor.float()");
  }
  py::tuple shape = cai["shape"];
  if (shape.size() != ndim) {
    value_error(what + " must be " + std::to_string(ndim) + "-D, got " + std::to_string(shape.size()) + "-D");
  }
  ArrayView view;
  for (py::handle d : shape) view.shape.push_back(d.cast<int64_t>());
  check_shape(view.shape, what);
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    py::tuple strides = cai["strides"];
    int64_t expected = sizeof(float);
    for (int64_t i = static_cast<int64_t>(ndim) - 1; i >= 0; --i) {
      if (view.shape[i] != 1 && strides[i].cast<int64_t>() != expected) {
        value_error(what + " must be C-contiguous; make it contiguous with tensor.contiguous()");
      }
      expected *= view.shape[i];
    }
  }
  py::tuple data = cai["data"];
  const auto ptr = data[0].cast<uintptr_t>();
  view.data = reinterpret_cast<const float*>(ptr);
  const int dev = kd_ext::cuda_pointer_device(view.data);
  if (dev < 0) value_error(what + " does not point to CUDA device memory");
  if (*device < 0) *device = dev;
  if (dev != *device) {
    value_error(what + " is on CUDA device " + std::to_string(dev) + " but other inputs are on device " +
                std::to_string(*device) + "; put all inputs on one device");
  }
  return view;
}
#endif

// Top-k within the map: the score kernels read the top_k largest of hw values.
void check_top_k(int score_mode, int64_t top_k, int64_t hw) {
  if (score_mode == kd_ext::math::kScoreTopK && (top_k < 1 || top_k > hw)) {
    value_error("top_k must be in [1, H*W] = [1, " + std::to_string(hw) + "], got " + std::to_string(top_k));
  }
}

// One call's scales and parameters, checked for memory safety (see the top of this file).
struct Prepared {
  std::vector<kd_ext::ScaleView> scales;
  int64_t batch = 0;
  kd_ext::MapParams params;
};

// Views the feature lists with `view(obj, what)` (a CPU buffer or a CUDA array) and checks the
// call; shared by the CPU and CUDA launchers.
template <class View>
Prepared prepare(const py::object& teacher_obj, const py::object& student_obj, int64_t out_h, int64_t out_w,
                 const std::string& distance, const std::string& fusion,
                 const std::optional<std::vector<float>>& weights, bool align_corners, double sigma,
                 const std::string& score, int64_t top_k, View&& view) {
  const std::vector<py::object> teacher_list = as_list(teacher_obj, "teacher_features");
  const std::vector<py::object> student_list = as_list(student_obj, "student_features");
  if (teacher_list.empty()) value_error("teacher_features is empty; pass at least one feature scale");
  if (teacher_list.size() != student_list.size()) {
    value_error("teacher_features and student_features have different lengths (" +
                std::to_string(teacher_list.size()) + " vs " + std::to_string(student_list.size()) +
                "); pass one student map per teacher map");
  }
  Prepared p;
  p.params.distance = parse_distance(distance);
  p.params.fusion = parse_fusion(fusion);
  p.params.score_mode = parse_score(score);
  const size_t num_scales = teacher_list.size();
  for (size_t k = 0; k < num_scales; ++k) {
    const ArrayView t = view(teacher_list[k], "teacher_features[" + std::to_string(k) + "]");
    const ArrayView s = view(student_list[k], "student_features[" + std::to_string(k) + "]");
    if (t.shape != s.shape) {
      value_error("teacher and student features at scale " + std::to_string(k) + " differ in shape: " +
                  shape_str(t.shape) + " vs " + shape_str(s.shape) + "; pair features of the same layer");
    }
    if (k == 0) p.batch = t.shape[0];
    if (t.shape[0] != p.batch) {
      value_error("batch size differs across scales: scale 0 has " + std::to_string(p.batch) + ", scale " +
                  std::to_string(k) + " has " + std::to_string(t.shape[0]));
    }
    p.scales.push_back({t.data, s.data, t.shape[1], t.shape[2], t.shape[3]});
  }
  if (out_h <= 0 || out_w <= 0) {
    value_error("output_size must be positive, got (" + std::to_string(out_h) + ", " + std::to_string(out_w) + ")");
  }
  if (out_h >= kMaxDim || out_w >= kMaxDim || out_h * out_w >= kMaxDim) {
    value_error("output_size (" + std::to_string(out_h) + ", " + std::to_string(out_w) + ") is too large: at most " +
                std::to_string(kMaxDim - 1) + " pixels per map; use a smaller output_size");
  }
  p.params.out_h = out_h;
  p.params.out_w = out_w;
  if (weights && weights->size() != num_scales) {
    value_error("weights must have one entry per scale (" + std::to_string(num_scales) + "), got " +
                std::to_string(weights->size()));
  }
  if (p.params.fusion == kd_ext::math::kWeighted) {
    if (!weights) value_error("fusion='weighted' needs one weight per scale (" + std::to_string(num_scales) + ")");
    p.params.weights = *weights;
  }
  p.params.align_corners = align_corners;
  if (!std::isfinite(sigma) || sigma < 0.0) {
    value_error("sigma must be a finite number >= 0 (0 disables smoothing), got " + std::to_string(sigma));
  }
  if (sigma > 0.0) {  // reflect padding reads at most `radius` pixels beyond each border
    const int radius = kd_ext::gaussian_radius(sigma);
    if (radius >= std::min(out_h, out_w)) {
      value_error("sigma=" + std::to_string(sigma) + " gives a blur radius of " + std::to_string(radius) +
                  " which must be smaller than the output height and width (" + std::to_string(out_h) + ", " +
                  std::to_string(out_w) + ") for reflect padding; use a larger output_size or a smaller sigma");
    }
  }
  p.params.sigma = sigma;
  check_top_k(p.params.score_mode, top_k, out_h * out_w);
  p.params.top_k = top_k;
  return p;
}

// The maps argument of image_score: [B, 1, H, W]; returns the score mode.
template <class View>
int prepare_scores(const py::object& maps_obj, const std::string& mode, int64_t top_k, View&& view, ArrayView* maps) {
  *maps = view(maps_obj, "anomaly_map");
  if (maps->shape[1] != 1) value_error("anomaly_map must have shape [B, 1, H, W], got " + shape_str(maps->shape));
  const int score_mode = parse_score(mode);
  if (score_mode == kd_ext::math::kScoreNone) value_error("score mode must be 'max' or 'topk' for image_score");
  check_top_k(score_mode, top_k, maps->shape[2] * maps->shape[3]);
  return score_mode;
}

py::tuple anomaly_map_py(const py::object& teacher_obj, const py::object& student_obj, int64_t out_h, int64_t out_w,
                         const std::string& distance, const std::string& fusion,
                         const std::optional<std::vector<float>>& weights, bool align_corners, double sigma,
                         const std::string& score, int64_t top_k) {
  std::vector<py::buffer_info> keep;
  const auto view = [&keep](const py::object& obj, const std::string& what) { return view_buffer(obj, what, 4, keep); };
  const Prepared p = prepare(teacher_obj, student_obj, out_h, out_w, distance, fusion, weights, align_corners, sigma,
                             score, top_k, view);
  py::array_t<float> maps({p.batch, int64_t{1}, out_h, out_w});
  py::object scores_obj = py::none();
  float* scores_ptr = nullptr;
  if (p.params.score_mode != kd_ext::math::kScoreNone) {
    py::array_t<float> scores(p.batch);
    scores_ptr = scores.mutable_data();
    scores_obj = scores;
  }
  float* maps_ptr = maps.mutable_data();
  {
    py::gil_scoped_release release;
    kd_ext::anomaly_map_cpu(p.scales, p.batch, p.params, maps_ptr, scores_ptr);
  }
  return py::make_tuple(maps, scores_obj);
}

py::array_t<float> image_score_py(const py::object& maps_obj, const std::string& mode, int64_t top_k) {
  std::vector<py::buffer_info> keep;
  const auto view = [&keep](const py::object& obj, const std::string& what) { return view_buffer(obj, what, 4, keep); };
  ArrayView maps;
  const int score_mode = prepare_scores(maps_obj, mode, top_k, view, &maps);
  py::array_t<float> scores(maps.shape[0]);
  float* scores_ptr = scores.mutable_data();
  {
    py::gil_scoped_release release;
    kd_ext::image_score_cpu(maps.data, maps.shape[0], maps.shape[2] * maps.shape[3], score_mode, top_k, scores_ptr);
  }
  return scores;
}

#ifdef KD_EXT_WITH_CUDA
float* cuda_output(const py::object& obj, const std::string& what, const std::vector<int64_t>& shape, int* device) {
  ArrayView v = view_cuda(obj, what, shape.size(), device);
  if (v.shape != shape) value_error(what + " must have shape " + shape_str(shape) + ", got " + shape_str(v.shape));
  return const_cast<float*>(v.data);
}

void require_cuda_device() {
  if (kd_ext::cuda_device_count() <= 0) {
    throw std::runtime_error("no CUDA device: kd_ext was built with CUDA but no GPU/driver is available");
  }
}

void anomaly_map_cuda_py(const py::object& teacher_obj, const py::object& student_obj, const py::object& maps_obj,
                         const py::object& scores_obj, int64_t out_h, int64_t out_w, const std::string& distance,
                         const std::string& fusion, const std::optional<std::vector<float>>& weights,
                         bool align_corners, double sigma, const std::string& score, int64_t top_k, uintptr_t stream) {
  require_cuda_device();
  int device = -1;
  const auto view = [&device](const py::object& obj, const std::string& what) {
    return view_cuda(obj, what, 4, &device);
  };
  const Prepared p = prepare(teacher_obj, student_obj, out_h, out_w, distance, fusion, weights, align_corners, sigma,
                             score, top_k, view);
  if (p.scales.size() > static_cast<size_t>(kd_ext::kMaxCudaScales)) {
    value_error("the CUDA kernel supports at most " + std::to_string(kd_ext::kMaxCudaScales) + " scales, got " +
                std::to_string(p.scales.size()));
  }
  if (p.batch > kd_ext::kMaxCudaBatch) {
    value_error("the CUDA kernel supports batches of at most " + std::to_string(kd_ext::kMaxCudaBatch) +
                " images, got " + std::to_string(p.batch) + "; split the batch");
  }
  float* maps_ptr = cuda_output(maps_obj, "out", {p.batch, 1, out_h, out_w}, &device);
  float* scores_ptr = nullptr;
  if (p.params.score_mode != kd_ext::math::kScoreNone) {
    if (scores_obj.is_none()) value_error("scores output is required when a score mode is given");
    scores_ptr = cuda_output(scores_obj, "scores", {p.batch}, &device);
  }
  py::gil_scoped_release release;
  kd_ext::anomaly_map_cuda(p.scales, p.batch, p.params, maps_ptr, scores_ptr, reinterpret_cast<void*>(stream));
}

void image_score_cuda_py(const py::object& maps_obj, const py::object& scores_obj, const std::string& mode,
                         int64_t top_k, uintptr_t stream) {
  require_cuda_device();
  int device = -1;
  const auto view = [&device](const py::object& obj, const std::string& what) {
    return view_cuda(obj, what, 4, &device);
  };
  ArrayView maps;
  const int score_mode = prepare_scores(maps_obj, mode, top_k, view, &maps);
  float* scores_ptr = cuda_output(scores_obj, "scores", {maps.shape[0]}, &device);
  py::gil_scoped_release release;
  kd_ext::image_score_cuda(maps.data, maps.shape[0], maps.shape[2] * maps.shape[3], score_mode, top_k, scores_ptr,
                           reinterpret_cast<void*>(stream));
}
#endif

// Test hook for parallel_for's exception handling: runs n calls in which the thread with worker
// id `throwing_worker` throws std::bad_alloc (the others wait up to 2 s for it to start, once).
// Raises MemoryError when it threw; returns the number of calls otherwise (no such worker ran).
int64_t parallel_for_probe(int64_t n, int throwing_worker) {
  py::gil_scoped_release release;
  std::atomic<bool> thrown{false}, waited{false};
  std::atomic<int64_t> calls{0};
  kd_ext::parallel_for(n, [&](int64_t, int worker) {
    calls.fetch_add(1);
    if (worker == throwing_worker) {
      thrown = true;
      throw std::bad_alloc();
    }
    if (waited.exchange(true)) return;
    for (int i = 0; i < 2000 && !thrown; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  return calls.load();
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "kd_ext native kernels (torch-free; float32 CPU, CUDA when built with it).";
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const kd_ext::OutOfMemory& oom) {
      PyErr_SetString(PyExc_MemoryError, oom.what());
    }
  });
  m.attr("MAX_MAP_PIXELS") = kMaxDim - 1;
  m.attr("__version__") = KD_EXT_VERSION;
  m.def("build_info", &build_info, "Features this build was compiled with.");
  m.def("gaussian_kernel_1d", &gaussian_kernel_1d_py, py::arg("sigma"),
        "Normalised 1-D Gaussian taps, size 2*floor(4*sigma+0.5)+1 (sigma > 0).");
  m.def("anomaly_map", &anomaly_map_py, py::arg("teacher_features"), py::arg("student_features"), py::arg("out_h"),
        py::arg("out_w"), py::arg("distance") = "cosine", py::arg("fusion") = "sum", py::arg("weights") = py::none(),
        py::arg("align_corners") = false, py::arg("sigma") = 4.0, py::arg("score") = "none", py::arg("top_k") = 1,
        "Fused anomaly maps [B, 1, out_h, out_w] (float32 numpy) and image scores [B] (None when score='none') "
        "from lists of C-contiguous float32 [B, C_k, H_k, W_k] arrays.");
  m.def("image_score", &image_score_py, py::arg("anomaly_map"), py::arg("mode") = "max", py::arg("top_k") = 1,
        "Image scores [B] of float32 maps [B, 1, H, W]: 'max' or 'topk' (mean of the top_k largest).");
  m.def("_parallel_for_probe", &parallel_for_probe, py::arg("n"), py::arg("throwing_worker"),
        "Test hook: parallel_for with one worker throwing std::bad_alloc (MemoryError when it ran).");
#ifdef KD_EXT_WITH_CUDA
  m.def("cuda_device_count", &kd_ext::cuda_device_count, "Visible CUDA devices (0 without a driver/GPU).");
  m.def("anomaly_map_cuda", &anomaly_map_cuda_py, py::arg("teacher_features"), py::arg("student_features"),
        py::arg("out"), py::arg("scores"), py::arg("out_h"), py::arg("out_w"), py::arg("distance") = "cosine",
        py::arg("fusion") = "sum", py::arg("weights") = py::none(), py::arg("align_corners") = false,
        py::arg("sigma") = 4.0, py::arg("score") = "none", py::arg("top_k") = 1, py::arg("stream") = 0,
        "CUDA version of anomaly_map writing into preallocated CUDA arrays out [B, 1, H, W] and scores [B] "
        "(objects with __cuda_array_interface__), queued on `stream` (a cudaStream_t as int).");
  m.def("image_score_cuda", &image_score_cuda_py, py::arg("anomaly_map"), py::arg("scores"), py::arg("mode") = "max",
        py::arg("top_k") = 1, py::arg("stream") = 0, "CUDA version of image_score writing into `scores` [B].");
#endif
}
