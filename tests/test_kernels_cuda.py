"""CUDA kernels: parity with the CPU kernel and the reference. Skipped without a CUDA device."""

import numpy as np
import pytest
import torch

from kd_ext import kernels

pytestmark = pytest.mark.skipif(
    not (kernels.cuda_available() and torch.cuda.is_available()),
    reason="needs kd_ext built with CUDA and a CUDA device",
)

ATOL = 1e-5
CASES = [
    # (batch, shapes, out, distance, fusion, align_corners, sigma)
    (1, [(64, 64, 64), (128, 32, 32), (256, 16, 16)], (256, 256), "cosine", "sum", True, 4.0),
    (3, [(5, 7, 9), (11, 3, 4)], (37, 29), "cosine", "product", False, 2.0),
    (2, [(8, 13, 11)], (40, 17), "l2", "product", False, 0.0),
    (4, [(3, 1, 1), (6, 2, 5), (9, 6, 3)], (23, 31), "l2", "mean", True, 1.0),
    (2, [(16, 9, 9), (4, 5, 5)], (1200, 33), "cosine", "weighted", False, 4.0),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("score", ["max", "topk"])
def test_cuda_matches_cpu_and_reference(case, score) -> None:
    batch, shapes, out, distance, fusion, align_corners, sigma = case
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(batch, *s, generator=gen) for s in shapes]
    student = [t + 0.5 * torch.randn(t.shape, generator=gen) for t in teacher]
    weights = [0.5, -1.5][: len(shapes)] if fusion == "weighted" else None
    top_k = 50 if score == "topk" else None
    options = {
        "distance": distance,
        "fusion": fusion,
        "weights": weights,
        "align_corners": align_corners,
        "sigma": sigma,
        "score": score,
        "top_k": top_k,
    }
    cpu_maps, cpu_scores = kernels.anomaly_map_and_score(teacher, student, out, backend="native", **options)
    cuda_t = [t.cuda() for t in teacher]
    cuda_s = [s.cuda() for s in student]
    maps, scores = kernels.anomaly_map_and_score(cuda_t, cuda_s, out, backend="native", **options)
    ref_maps, ref_scores = kernels.anomaly_map_and_score(cuda_t, cuda_s, out, backend="reference", **options)
    assert maps.is_cuda
    assert scores.is_cuda
    assert (maps.cpu() - cpu_maps).abs().max().item() <= ATOL
    assert (scores.cpu() - cpu_scores).abs().max().item() <= ATOL
    assert (maps - ref_maps).abs().max().item() <= ATOL
    assert (scores - ref_scores).abs().max().item() <= ATOL
    mode = "topk" if score == "topk" else "max"
    assert (kernels.image_score(maps, mode, top_k) - scores).abs().max().item() <= ATOL


def test_cuda_nan_propagates() -> None:
    gen = torch.Generator().manual_seed(1)
    teacher = [torch.randn(3, 4, 8, 8, generator=gen).cuda()]
    student = [torch.randn(3, 4, 8, 8, generator=gen).cuda()]
    teacher[0][1, 0, 2, 2] = float("nan")
    maps, scores = kernels.anomaly_map_and_score(teacher, student, (32, 32), sigma=1.0, backend="native")
    ref = kernels.anomaly_map(teacher, student, (32, 32), sigma=1.0, backend="reference")
    assert torch.equal(torch.isnan(maps), torch.isnan(ref))
    assert torch.isnan(scores[1])
    assert not torch.isnan(scores[[0, 2]]).any()


def test_cuda_respects_current_stream_and_rejects_mixing() -> None:
    gen = torch.Generator().manual_seed(2)
    teacher = [torch.randn(2, 4, 8, 8, generator=gen).cuda()]
    student = [torch.randn(2, 4, 8, 8, generator=gen).cuda()]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        maps = kernels.anomaly_map(teacher, student, (32, 32), sigma=1.0, backend="native")
    stream.synchronize()
    expected = kernels.anomaly_map([t.cpu() for t in teacher], [s.cpu() for s in student], (32, 32), sigma=1.0)
    np.testing.assert_allclose(maps.cpu().numpy(), expected.numpy(), atol=ATOL)
    with pytest.raises(ValueError, match="one device"):
        kernels.anomaly_map([teacher[0]], [student[0].cpu()], (32, 32), sigma=1.0)


def test_cuda_output_size_cap_is_the_shared_rule() -> None:
    teacher = [torch.randn(1, 4, 8, 8).cuda()]
    with pytest.raises(ValueError, match="pixels per map"):
        kernels.anomaly_map(teacher, teacher, 100_000, sigma=0.0, backend="native")


def test_cuda_out_of_memory_raises_memory_error_and_next_call_works() -> None:
    """The maps fit in device memory, the kernel's working buffers do not: MemoryError, then recovery."""
    batch, size = 4, (4096, 4096)
    gen = torch.Generator().manual_seed(3)
    teacher = [torch.randn(batch, 4, 16, 16, generator=gen).cuda()]
    student = [torch.randn(batch, 4, 16, 16, generator=gen).cuda()]
    expected = kernels.anomaly_map(teacher, student, (64, 64), sigma=1.0, backend="native")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    output = batch * size[0] * size[1] * 4
    free, _ = torch.cuda.mem_get_info()
    if free < output + 256 * 2**20:
        pytest.skip("not enough free device memory to set up the case")
    blocker = torch.empty(free - output - 64 * 2**20, dtype=torch.uint8, device="cuda")
    try:
        with pytest.raises(MemoryError, match=r"CUDA anomaly-map kernel.*smaller batch"):
            kernels.anomaly_map(teacher, student, size, sigma=1.0, backend="native")
    finally:
        del blocker
        torch.cuda.empty_cache()
    again = kernels.anomaly_map(teacher, student, (64, 64), sigma=1.0, backend="native")
    assert torch.equal(again, expected)
