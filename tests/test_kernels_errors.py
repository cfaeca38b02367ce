"""Bad input raises a clear Python exception (never a crash); fuzzing of the raw binding."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kd_ext import kernels

native = pytest.importorskip("kd_ext._native")


def _feats(batch: int = 2, shapes=((4, 8, 8), (8, 4, 4)), dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(batch, *s, generator=gen).to(dtype) for s in shapes]
    student = [torch.randn(batch, *s, generator=gen).to(dtype) for s in shapes]
    return teacher, student


T, S = _feats()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: kernels.anomaly_map(T, S[:1], 32), ValueError, "different lengths"),
        (lambda: kernels.anomaly_map([], [], 32), ValueError, "empty"),
        (lambda: kernels.anomaly_map(T[0], S[0], 32), TypeError, "list or tuple"),
        (lambda: kernels.anomaly_map([T[0], T[1][:1]], [S[0], S[1][:1]], 32), ValueError, "batch size differs"),
        (lambda: kernels.anomaly_map(T, [S[0], S[1][:, :3]], 32), ValueError, "differ in shape"),
        (lambda: kernels.anomaly_map([t.double() for t in T], [s.double() for s in S], 32), TypeError, "float32"),
        (lambda: kernels.anomaly_map([t.half() for t in T], [s.half() for s in S], 32), TypeError, "float32"),
        (lambda: kernels.anomaly_map([t.int() for t in T], [s.int() for s in S], 32), TypeError, "float32"),
        (lambda: kernels.anomaly_map([t[:0] for t in T], [s[:0] for s in S], 32), ValueError, "empty"),
        (lambda: kernels.anomaly_map([T[0][0]], [S[0][0]], 32), ValueError, "4-D"),
        (lambda: kernels.anomaly_map(T, [s.numpy() for s in S], 32), TypeError, "do not mix"),
        (lambda: kernels.anomaly_map(T, S, 32, sigma=-1.0), ValueError, "sigma"),
        (lambda: kernels.anomaly_map(T, S, 32, sigma=float("nan")), ValueError, "sigma"),
        (lambda: kernels.anomaly_map(T, S, 32, sigma=float("inf")), ValueError, "sigma"),
        (lambda: kernels.anomaly_map(T, S, 32, sigma="4"), TypeError, "sigma"),
        (lambda: kernels.anomaly_map(T, S, 16, sigma=4.0), ValueError, "blur radius"),
        (lambda: kernels.anomaly_map(T, S, 0), ValueError, "positive"),
        (lambda: kernels.anomaly_map(T, S, (-5, 32)), ValueError, "positive"),
        (lambda: kernels.anomaly_map(T, S, (32, 32, 3)), TypeError, "output_size"),
        (lambda: kernels.anomaly_map(T, S, 32.0), TypeError, "output_size"),
        (lambda: kernels.anomaly_map(T, S, 32, distance="l1"), ValueError, "distance"),
        (lambda: kernels.anomaly_map(T, S, 32, fusion="max"), ValueError, "fusion"),
        (lambda: kernels.anomaly_map(T, S, 32, fusion="weighted"), ValueError, "weights"),
        (lambda: kernels.anomaly_map(T, S, 32, weights=[1.0]), ValueError, "one entry per scale"),
        (lambda: kernels.anomaly_map(T, S, 32, fusion="product", weights=[1.0, 2.0]), ValueError, "weights"),
        (lambda: kernels.anomaly_map(T, S, 32, fusion="weighted", weights=[1.0, "a"]), TypeError, "numbers"),
        (lambda: kernels.anomaly_map(T, S, 32, fusion="weighted", weights="12"), TypeError, "sequence"),
        (lambda: kernels.anomaly_map(T, S, 32, backend="gpu"), ValueError, "backend"),
        (lambda: kernels.anomaly_map_and_score(T, S, 32, sigma=1.0, score="topk"), TypeError, "top_k"),
        (lambda: kernels.anomaly_map_and_score(T, S, 32, sigma=1.0, score="topk", top_k=0), ValueError, "top_k"),
        (lambda: kernels.anomaly_map_and_score(T, S, 8, sigma=1.0, score="topk", top_k=65), ValueError, "top_k"),
        (lambda: kernels.anomaly_map_and_score(T, S, 8, sigma=1.0, score="max", top_k=3), ValueError, "top_k"),
        (lambda: kernels.anomaly_map_and_score(T, S, 8, sigma=1.0, score="median"), ValueError, "score mode"),
        (lambda: kernels.anomaly_map_and_score(T, S, 8, sigma=1.0, score="none"), ValueError, "score mode"),
        (lambda: kernels.image_score(torch.zeros(2, 3, 4, 4)), ValueError, r"\[B, 1, H, W\]"),
        (lambda: kernels.image_score(torch.zeros(0, 1, 4, 4)), ValueError, "empty"),
        (lambda: kernels.image_score(torch.zeros(2, 1, 4, 4, dtype=torch.float64)), TypeError, "float32"),
        (lambda: kernels.image_score(torch.zeros(2, 1, 4, 4), "topk", 17), ValueError, "top_k"),
        (lambda: kernels.image_score([[1.0]]), TypeError, "torch.Tensor or numpy.ndarray"),
    ],
)
def test_bad_calls_raise_clear_errors(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- one rule per option, every backend


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([float("nan"), 1.0], "finite"),
        ([1.0, float("inf")], "finite"),
        ([-float("inf"), 1.0], "finite"),
        ([0.0, 0.0], "all zero"),
    ],
)
@pytest.mark.parametrize("fusion", ["weighted", "sum"])
def test_non_finite_or_all_zero_weights_are_refused(backend, weights, match, fusion) -> None:
    with pytest.raises(ValueError, match=match):
        kernels.anomaly_map(T, S, 32, fusion=fusion, weights=weights, sigma=1.0, backend=backend)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1e308, 1e308], r"finite numbers whose absolute values sum to at most 8.51e\+37, got \[1e\+308, 1e\+308\]"),
        ([3e38, -1.0], "finite numbers whose absolute values sum"),  # finite in float32, but 2 * 3e38 is not
        ([5e37, 5e37], "scale all weights down together"),
        ([1e-50, 0.0], r"all zero in float32"),  # rounds to zero: every map would be zero
    ],
)
def test_weights_follow_one_rule_after_the_float32_cast(backend, weights, match) -> None:
    """Finite float64 weights beyond float32's range gave inf scores on both backends."""
    with pytest.raises(ValueError, match=match):
        kernels.anomaly_map_and_score(T, S, 32, weights=weights, sigma=1.0, backend=backend)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_largest_accepted_weights_give_finite_maps_and_scores(backend) -> None:
    from kd_ext.kernels._options import MAX_WEIGHT_SUM

    opposite = [-t for t in T]  # distance 2 everywhere, the largest either distance reaches
    weights = [MAX_WEIGHT_SUM * 0.75, MAX_WEIGHT_SUM * 0.25]
    maps, scores = kernels.anomaly_map_and_score(T, opposite, 32, weights=weights, sigma=1.0, backend=backend)
    assert torch.isfinite(maps).all()
    assert torch.isfinite(scores).all()
    assert float(scores.min()) > 1e38  # the weights were used, not rounded away


def test_both_backends_get_the_float32_weights() -> None:
    from kd_ext.kernels import KernelOptions

    assert KernelOptions(16, weights=[0.1, 1], sigma=0).weights == (float(np.float32(0.1)), 1.0)


@pytest.mark.parametrize("sigma", [1e300, 1e308, sys.float_info.max])
def test_huge_sigma_is_refused_with_a_compact_message(sigma) -> None:
    """sigma=1e300 printed a 301-digit radius; sigma=1e308 raised OverflowError instead of ValueError."""
    with pytest.raises(ValueError, match=r"blur radius of \d(\.\d+)?e\+30\d \(.* = \d(\.\d+)?e\+30\d taps\)") as error:
        kernels.anomaly_map(T, S, 32, sigma=sigma)
    assert len(str(error.value)) < 300


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("size", [100_000, (2**15, 2**15), (1, 2**30), (2**31, 1)])
def test_output_size_cap_is_one_rule_for_every_backend(backend, size) -> None:
    """The reference backend used to try to allocate 40 GB for a 100000x100000 map."""
    with pytest.raises(ValueError, match="pixels per map"):
        kernels.anomaly_map(T, S, size, sigma=0.0, backend=backend)
    with pytest.raises(ValueError, match="pixels per map"):
        kernels.anomaly_map_and_score(T, S, size, sigma=0.0, backend=backend)


def test_largest_map_size_is_accepted_by_the_size_rule() -> None:
    from kd_ext.kernels._options import validate_output_size

    assert validate_output_size((1, kernels.MAX_MAP_PIXELS)) == (1, kernels.MAX_MAP_PIXELS)
    assert validate_output_size(32767) == (32767, 32767)
    with pytest.raises(ValueError, match="pixels per map"):
        validate_output_size((1, kernels.MAX_MAP_PIXELS + 1))


@pytest.mark.parametrize("sigma", [0, 0.0, 1, 2.5, np.float32(4.0), np.int64(3)])
def test_validate_sigma_returns_float(sigma) -> None:
    value = kernels.validate_sigma(sigma)
    assert isinstance(value, float)
    assert value == float(sigma)
    assert kernels.validate_sigma(sigma, (64, 48)) == value


@pytest.mark.parametrize("sigma", [float("nan"), float("inf"), -float("inf"), -1.0, -1e-9, np.float32("nan")])
@pytest.mark.parametrize("map_size", [None, (256, 256)])
def test_validate_sigma_refuses_non_finite_and_negative(sigma, map_size) -> None:
    with pytest.raises(ValueError, match=r"sigma must be >= 0 and finite"):
        kernels.validate_sigma(sigma, map_size)


@pytest.mark.parametrize("sigma", [True, "4", None, [4.0], torch.tensor(4.0)])
def test_validate_sigma_refuses_non_numbers(sigma) -> None:
    with pytest.raises(TypeError, match="sigma must be a number"):
        kernels.validate_sigma(sigma)


def test_validate_sigma_radius_must_fit_the_map() -> None:
    # radius floor(4 * sigma + 0.5) < min(H, W): for 16 pixels sigma must stay below 3.875.
    assert kernels.validate_sigma(3.874, (16, 40)) == 3.874
    with pytest.raises(ValueError, match=r"blur radius of 16 .*\(16, 40\).*sigma < 3\.875"):
        kernels.validate_sigma(3.875, (16, 40))
    with pytest.raises(ValueError, match="blur radius"):
        kernels.validate_sigma(1e30, (256, 256))
    assert kernels.validate_sigma(1e30) == 1e30  # no map size, no radius check
    assert kernels.validate_sigma(0.0, (1, 1)) == 0.0  # no smoothing fits any map


@pytest.mark.parametrize(("map_size", "error"), [((16,), TypeError), ((16.0, 16), TypeError), ((0, 16), ValueError)])
def test_validate_sigma_checks_map_size(map_size, error) -> None:
    with pytest.raises(error, match="map_size"):
        kernels.validate_sigma(1.0, map_size)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_kernels_refuse_sigma_with_the_validate_sigma_message(backend) -> None:
    with pytest.raises(ValueError) as expected:
        kernels.validate_sigma(4.0, (16, 20))
    with pytest.raises(ValueError) as raised:
        kernels.anomaly_map(T, S, (16, 20), sigma=4.0, backend=backend)
    assert str(raised.value) == str(expected.value)


# --------------------------------------------------------------------------- one options object


def test_options_are_str_enums_accepted_as_strings_and_members() -> None:
    from kd_ext.kernels import Distance, Fusion, KernelOptions, ScoreMode

    by_name = KernelOptions(32, "l2", "mean", sigma=1, score="topk", top_k=np.int64(5))
    by_member = KernelOptions((32, 32), Distance.L2, Fusion.MEAN, sigma=1.0, score=ScoreMode.TOPK, top_k=5)
    assert by_name == by_member
    assert by_name.distance is Distance.L2
    assert by_name.fusion is Fusion.MEAN
    assert by_name.score is ScoreMode.TOPK
    assert by_name.top_k == 5
    assert type(by_name.top_k) is int
    assert by_name.sigma == 1.0
    assert type(by_name.sigma) is float
    assert by_name.output_size == (32, 32)
    assert Distance.COSINE == "cosine"  # str Enums, as anomalib's options
    assert kernels.DISTANCES == ("cosine", "l2")
    assert kernels.SCORE_MODES == ("max", "topk")


def test_options_are_frozen_and_normalised() -> None:
    import dataclasses

    from kd_ext.kernels import Fusion, KernelOptions

    options = KernelOptions(16, fusion="sum", weights=[1, 2.5], sigma=0, score=None)
    assert options.fusion is Fusion.WEIGHTED  # weights with "sum" are a weighted sum
    assert options.weights == (1.0, 2.5)
    assert options.top_k is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.sigma = 2.0
    options.check_scales(2)
    with pytest.raises(ValueError, match="one entry per scale"):
        options.check_scales(3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"distance": "l1"}, ValueError, r"Unknown distance 'l1'; choose one of 'cosine', 'l2'\."),
        ({"fusion": "max"}, ValueError, "Unknown fusion 'max'; choose one of"),
        ({"score": "none"}, ValueError, "Unknown score mode 'none'; choose one of"),
        ({"score": "topk"}, TypeError, "top_k"),
        ({"top_k": 2}, ValueError, "drop top_k"),
        ({"sigma": 9.0}, ValueError, "blur radius"),
        ({"align_corners": "yes"}, TypeError, "align_corners"),
        ({"fusion": "weighted"}, ValueError, "needs weights"),
    ],
)
def test_options_refuse_bad_values_when_built(kwargs, error, match) -> None:
    from kd_ext.kernels import KernelOptions

    with pytest.raises(error, match=match):
        KernelOptions(32, **kwargs)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_enum_members_and_strings_give_the_same_maps(backend) -> None:
    from kd_ext.kernels import Backend, Distance, Fusion, ScoreMode

    by_name = kernels.anomaly_map_and_score(
        T, S, 24, distance="l2", fusion="product", sigma=1.0, score="topk", top_k=4, backend=backend
    )
    by_member = kernels.anomaly_map_and_score(
        T,
        S,
        24,
        distance=Distance.L2,
        fusion=Fusion.PRODUCT,
        sigma=1.0,
        score=ScoreMode.TOPK,
        top_k=4,
        backend=Backend(backend),
    )
    for left, right in zip(by_name, by_member, strict=True):
        assert torch.equal(left, right)


# --------------------------------------------------------------------------- out of memory

# Batch 8 of 4096x4096 maps: the 512 MiB output fits under the address-space limit set below, the
# working planes (64 MiB per thread) do not. The first call (before the limit) starts the
# thread pool, so the limit is relative to what the process already uses.
_OOM_SCRIPT = textwrap.dedent(
    """
    import resource
    import numpy as np
    from kd_ext import kernels

    batch, height, width = 8, 4096, 4096
    rng = np.random.default_rng(0)
    teacher = [rng.standard_normal((batch, 4, 16, 16), dtype=np.float32)]
    student = [rng.standard_normal((batch, 4, 16, 16), dtype=np.float32)]
    expected = kernels.anomaly_map(teacher, student, (64, 64), sigma=1.0, backend="native")

    def address_space():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

    output = batch * height * width * 4
    limit = address_space() + output + 32 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        kernels.anomaly_map(teacher, student, (height, width), sigma=1.0, backend="native")
    except MemoryError as error:
        print("MEMORYERROR", error, flush=True)
    else:
        print("NO ERROR", flush=True)
    again = kernels.anomaly_map(teacher, student, (64, 64), sigma=1.0, backend="native")
    print("NEXT CALL", bool(np.array_equal(again, expected)), flush=True)
    """
)


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc/self/status")
def test_out_of_memory_raises_memory_error_and_next_call_works() -> None:
    proc = _run_python(_OOM_SCRIPT)
    assert proc.returncode == 0, f"kernel process died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("MEMORYERROR"), proc.stdout
    assert "8 anomaly maps of 4096x4096" in lines[0]
    assert "smaller batch" in lines[0]
    assert "output_size" in lines[0]
    assert lines[1] == "NEXT CALL True"


_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from kd_ext import _native, kernels

    rng = np.random.default_rng(0)
    teacher = [rng.standard_normal((9, 4, 8, 8), dtype=np.float32)]
    student = [rng.standard_normal((9, 4, 8, 8), dtype=np.float32)]
    expected = kernels.anomaly_map(teacher, student, (40, 40), sigma=1.0, backend="native")
    raised = {0: 0, 1: 0}
    for worker in raised:
        for _ in range(10):
            try:
                _native._parallel_for_probe(64, worker)
            except MemoryError:
                raised[worker] += 1
            again = kernels.anomaly_map(teacher, student, (40, 40), sigma=1.0, backend="native")
            assert np.array_equal(again, expected)
    print(raised[0], raised[1], flush=True)
    """
)


def test_exception_in_a_worker_thread_reaches_python_and_pool_recovers() -> None:
    """Worker 0 is the calling thread, worker 1 a pool helper; either one throwing must not abort."""
    proc = _run_python(_PARALLEL_SCRIPT)
    assert proc.returncode == 0, f"process died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    from_caller, from_helper = (int(v) for v in proc.stdout.split())
    assert from_caller == 10
    assert from_helper >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this session")
def test_cpu_cuda_mixing_is_rejected() -> None:
    with pytest.raises(ValueError, match="one device"):
        kernels.anomaly_map([T[0].cuda()], [S[0]], 32, sigma=1.0)


def test_native_backend_without_cuda_device_is_clear() -> None:
    if kernels.cuda_available():
        pytest.skip("a CUDA device is present")
    info = kernels.build_info()
    assert info["cuda_devices"] == 0
    if info["cuda"]:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            native.anomaly_map_cuda([T[0]], [S[0]], T[0], None, 8, 8)


# --------------------------------------------------------------------------- fuzzing

GOOD = {
    "teacher_features": None,
    "student_features": None,
    "out_h": 20,
    "out_w": 18,
    "distance": "cosine",
    "fusion": "sum",
    "weights": None,
    "align_corners": False,
    "sigma": 1.0,
    "score": "max",
    "top_k": 1,
}


def _good_arrays(rng: np.random.Generator):
    shapes = [(3, 5, 6), (4, 3, 2)]
    teacher = [rng.standard_normal((2, *s), dtype=np.float32) for s in shapes]
    student = [rng.standard_normal((2, *s), dtype=np.float32) for s in shapes]
    return teacher, student


def _bad_array(rng: np.random.Generator, good: np.ndarray):
    if not isinstance(good, np.ndarray) or good.ndim != 4 or good.size == 0 or good.dtype != np.float32:
        return good  # already bad (mutated twice)
    choices = [
        lambda: good.astype(np.float64),
        lambda: good.astype(np.float16),
        lambda: good.astype(np.int32),
        lambda: good[..., ::2],
        lambda: np.asfortranarray(good),
        lambda: good.transpose(0, 2, 3, 1),
        lambda: good[0],
        lambda: good[None],
        lambda: good[:0],
        lambda: good[:, :0],
        lambda: good[:1],
        lambda: good[:, :1],
        lambda: np.zeros((2, 3, 0, 4), np.float32),
        lambda: None,
        lambda: 3.0,
        lambda: "array",
        lambda: [[1.0, 2.0]],
        lambda: bytearray(b"\x00" * 64),
        lambda: torch.from_numpy(good),
    ]
    return choices[rng.integers(len(choices))]()


def _mutate(rng: np.random.Generator, kwargs: dict) -> dict:  # noqa: PLR0912
    kwargs = dict(kwargs)
    key = str(rng.choice(list(kwargs)))
    teacher, student = kwargs["teacher_features"], kwargs["student_features"]
    if key in {"teacher_features", "student_features"}:
        roll = rng.integers(6)
        if not isinstance(kwargs[key], (list, tuple)):
            return kwargs  # already bad (mutated twice)
        feats = list(kwargs[key])
        if roll == 0:  # length mismatch (or, mutated twice, mismatched scales)
            kwargs[key] = feats[:1] if key == "teacher_features" else feats[1:]
        elif roll == 1:
            kwargs[key] = []
        elif roll == 2:
            kwargs[key] = rng.choice([None, 7, "x", {"a": 1}], 1)[0] if rng.random() < 0.5 or not feats else feats[0]
        elif feats:
            index = int(rng.integers(len(feats)))
            feats[index] = _bad_array(rng, feats[index])
            kwargs[key] = feats if roll != 5 else tuple(feats)
        if roll == 1 and rng.random() < 0.5:
            kwargs["teacher_features"], kwargs["student_features"] = [], []
    elif key in {"out_h", "out_w"}:
        kwargs[key] = rng.choice([0, -1, -(2**40), 2**40, 2**31, 1])
        if kwargs[key] == 1:  # valid alone; blur radius 4 needs > 4 pixels
            kwargs["sigma"] = 1.0
    elif key == "sigma":
        kwargs[key] = float(rng.choice([-1.0, float("nan"), float("inf"), -0.0001, 1e30, 100.0]))
    elif key == "distance":
        kwargs[key] = str(rng.choice(["", "COSINE", "l1", "cos"]))
    elif key == "fusion":
        kwargs[key] = str(rng.choice(["weighted", "max", "", "Sum"]))
    elif key == "weights":
        kwargs[key] = [1.0] * int(rng.choice([0, 1, 3, 5]))
    elif key == "score":
        kwargs[key] = str(rng.choice(["min", "", "TOPK"]))
    elif key == "top_k":
        kwargs["score"] = "topk"
        kwargs[key] = int(rng.choice([0, -3, 20 * 18 + 1, 2**40]))
    elif key == "align_corners":
        kwargs[key] = ["yes", [1], {"a": 1}][int(rng.integers(3))]
    del teacher, student
    return kwargs


def run_fuzz(iterations: int, seed: int) -> int:
    """Make `iterations` bad calls to the raw binding; returns how many raised as expected."""
    rng = np.random.default_rng(seed)
    raised = 0
    for _ in range(iterations):
        teacher, student = _good_arrays(rng)
        kwargs = _mutate(rng, {**GOOD, "teacher_features": teacher, "student_features": student})
        kwargs = _mutate(rng, kwargs) if rng.random() < 0.3 else kwargs
        try:
            native.anomaly_map(**kwargs)
        except (ValueError, TypeError, OverflowError):
            raised += 1
        else:
            summary = {k: (type(v).__name__, getattr(v, "shape", v)) for k, v in kwargs.items()}
            msg = f"bad call did not raise: {summary}"
            raise AssertionError(msg)
    for _ in range(iterations // 4):
        bad = _bad_array(rng, rng.standard_normal((2, 1, 6, 5), dtype=np.float32))
        try:
            native.image_score(bad, str(rng.choice(["max", "topk", "x"])), int(rng.choice([0, 31, 2**40, 5])))
        except (ValueError, TypeError, OverflowError):
            raised += 1
    return raised


def test_fuzz_binding_in_process() -> None:
    assert run_fuzz(400, seed=1) >= 400


def test_fuzz_binding_in_subprocess() -> None:
    """A crash (segfault/abort) in the binding would fail here instead of killing pytest."""
    here = str(__file__.rsplit("/", 1)[0])
    code = f"import sys; sys.path.insert(0, {here!r}); import test_kernels_errors as t; print(t.run_fuzz(400, seed=2))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) >= 400
