"""pytest-benchmark view of the fused kernel benchmark.

Run from the repository root::

    /work/venv/bin/pytest benchmarks/test_kernels_bench.py --benchmark-only

(``python benchmarks/kernels_report.py`` runs the same workloads interleaved and writes
``benchmarks/results/kernels.md`` / ``kernels.json``.)
"""

import pytest
import torch

from kd_ext import kernels

kernels_report = pytest.importorskip("kernels_report")

CASES = [(model, batch) for model in kernels_report.BACKBONES for batch in kernels_report.BATCHES]


@pytest.fixture(scope="module")
def impls():
    return kernels_report.make_impls()


@pytest.mark.skipif(not kernels.native_available(), reason="kd_ext._native is not built")
@pytest.mark.parametrize("impl", kernels_report.IMPLS)
@pytest.mark.parametrize(("model", "batch"), CASES, ids=[f"{m}-b{b}" for m, b in CASES])
def test_anomaly_map(benchmark, impls, impl, model, batch) -> None:
    shapes = kernels_report.BACKBONES[model]
    teacher, student = kernels_report.make_inputs(shapes, batch)[0]
    heavy = impl != "native" and kernels_report.feature_bytes(shapes, batch) * (1 if batch < 32 else 4) > 100 << 20
    benchmark.group = f"{model}-b{batch}"
    benchmark.extra_info["bytes"] = kernels_report.feature_bytes(shapes, batch) + kernels_report.map_bytes(batch)
    with torch.inference_mode():
        benchmark.pedantic(impls[impl], args=(teacher, student), rounds=3 if heavy else 10, warmup_rounds=1)
