"""One OpenVINO IR that serves every task of a cross-task student.

The IR takes ``float32`` RGB ``[N, 3, H, W]`` in ``[0, 1]`` (batch dynamic) and has, for each task ``t``, the
outputs ``t/pred_score``, ``t/pred_label``, ``t/anomaly_map``, ``t/pred_mask`` (probabilities, threshold 0.5).
The trunk runs once per image for all heads. :class:`kd_ext.edge.EdgeModel` reads it with ``task="t"``.
A single-task IR (the selected task only, anomalib's output names) is the ordinary ``export_openvino``.
"""

from pathlib import Path

import torch
from torch import nn

from kd_ext.edge.contract import OUTPUT_FIELDS, task_output
from kd_ext.export.openvino import save_ir
from kd_ext.models.cross_task import CALIBRATED_THRESHOLD, CrossTaskStudent


class _AllTasks(nn.Module):
    """Normalisation + trunk + every head, outputs flattened in (task, field of ``OUTPUT_FIELDS``) order."""

    def __init__(self, student: CrossTaskStudent) -> None:
        super().__init__()
        self.model = student.model
        normalize = student.pre_processor.transform.transforms[-1]
        self.register_buffer("mean", torch.tensor(normalize.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(normalize.std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs: list[torch.Tensor] = []
        for predictions in self.model.forward_all((images - self.mean) / self.std).values():
            fields = {
                "pred_score": predictions.pred_score,
                "anomaly_map": predictions.anomaly_map,
                "pred_label": predictions.pred_score > CALIBRATED_THRESHOLD,
                "pred_mask": predictions.anomaly_map > CALIBRATED_THRESHOLD,
            }
            outputs += [fields[field] for field in OUTPUT_FIELDS]
        return tuple(outputs)


def output_names(tasks: tuple[str, ...]) -> list[str]:
    """IR output names in order: ``<task>/<field>`` (the edge contract's :func:`task_output`)."""
    return [task_output(task, field) for task in tasks for field in OUTPUT_FIELDS]


def export_all_tasks_openvino(
    student: CrossTaskStudent,
    xml_path: str | Path,
    image_size: tuple[int, int] = (256, 256),
    precision: str = "fp32",
) -> Path:
    """Export every task head (one shared trunk pass) to one OpenVINO IR.

    Args:
        student: Trained student.
        xml_path: Destination ``.xml`` (the ``.bin`` goes next to it; both written atomically).
        image_size: Input ``(H, W)``.
        precision: ``"fp32"`` or ``"fp16"`` (weights stored as FP16).

    Returns:
        Path: ``xml_path``.

    Raises:
        ValueError: If the precision is unknown.
    """
    import openvino as ov  # noqa: PLC0415

    precision = str(precision)
    if precision not in {"fp32", "fp16"}:
        msg = f"Unknown precision '{precision}' for the multi-task IR; choose 'fp32' or 'fp16'."
        raise ValueError(msg)
    student.eval()
    wrapper = _AllTasks(student).eval()
    example = torch.rand(1, 3, *image_size)
    with torch.no_grad():
        ov_model = ov.convert_model(wrapper, example_input=example, input=[(-1, 3, *image_size)])
    names = output_names(student.tasks)
    for port, name in zip(ov_model.outputs, names, strict=True):
        port.get_tensor().set_names({name})
    info = {
        "precision": precision,
        "model": "CrossTaskStudent",
        "tasks": ",".join(student.tasks),
        "calibration": "none",
        "input_size": f"{image_size[0]}x{image_size[1]}",
        "threshold": f"{CALIBRATED_THRESHOLD} (calibrated probabilities)",
    }
    return save_ir(ov_model, Path(xml_path), compress_to_fp16=precision == "fp16", info=info)
