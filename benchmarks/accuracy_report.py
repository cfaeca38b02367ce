"""Results store, statistics, Markdown tables and plot of the accuracy benchmark (``accuracy.py``).

Nothing here imports torch or anomalib, so ``accuracy.py --render-only`` and the tests stay fast.

The store (``accuracy.json``) holds one record per finished run under ``runs``: the protocol it followed, row,
set, seed, epochs, metrics, timings, trainable parameters, the machine it ran on and the exact command. A rerun
of the same (protocol, row, set, seed, epochs) replaces its record. Records of the earlier one-seed benchmark
(a top-level ``results`` list) are moved, unchanged, under ``legacy`` and left out of the tables; the Markdown
says so.
"""

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

METRICS = {
    "image_AUROC": "image AUROC",
    "image_F1Max": "image F1max",
    "pixel_AUROC": "pixel AUROC",
    "pixel_AUPRO": "AUPRO@0.3",
}
PLOTTED = ("image_AUROC", "pixel_AUROC")
KEY_FIELDS = ("protocol", "row", "set", "seed", "epochs")
LEGACY_NOTE = (
    "Records of the earlier one-seed benchmark (seed 0 only, bottle and hazelnut_toy only, scores normalised and "
    "clamped to [0, 1] by anomalib's post-processor with the test set as validation set, inference timings), "
    "kept unchanged; not comparable with the runs of the current protocol."
)
DIGITS = 4


@dataclass(frozen=True)
class Stat:
    """Mean, spread and count of one metric of one row on one set.

    Attributes:
        mean: Mean over the runs.
        std: Sample standard deviation over seeds; 0.0 for a deterministic row run once; ``None`` when the spread
            is unknown (a trained row with fewer than two seeds).
        n: Number of runs.
    """

    mean: float
    std: float | None
    n: int


def stat(values: Sequence[float], deterministic: bool = False) -> Stat:
    """Summarise the values of one metric over seeds.

    Args:
        values: One value per run (at least one).
        deterministic: The row gives the same result on every run, so a single run has no spread.

    Returns:
        Stat: Mean and sample standard deviation (``None`` for one run of a row that is not deterministic).

    Raises:
        ValueError: If ``values`` is empty.
    """
    if not values:
        msg = "stat() needs at least one value; summarise only rows that have runs."
        raise ValueError(msg)
    if len(values) >= 2:
        std: float | None = statistics.stdev(values)
    else:
        std = 0.0 if deterministic else None
    return Stat(mean=statistics.fmean(values), std=std, n=len(values))


def significant(a: Stat, b: Stat) -> bool:
    """Whether two rows differ by more than their seed spreads: ``|mean_a - mean_b| > std_a + std_b``.

    A claim that a component helps is made only when this holds. With an unknown spread (a trained row with one
    seed) nothing can be claimed, so the answer is ``False``.

    Args:
        a: One row's metric.
        b: The other row's metric.

    Returns:
        bool: ``True`` when the margin exceeds the sum of the two standard deviations.
    """
    if a.std is None or b.std is None:
        return False
    return abs(a.mean - b.mean) > a.std + b.std


@dataclass
class RowSummary:
    """Everything the tables show for one row on one set, over its runs of the current protocol.

    Attributes:
        row: Row name.
        n: Runs (seeds) finished.
        expected: Runs the protocol asks for (1 for a deterministic row).
        one_pass: Whether the row fits in one pass over the data (no epochs, deterministic).
        epochs: Training epochs of each run.
        metrics: Metric name -> statistics, for the metrics its runs report.
        fit_seconds: Mean fit time (training plus fitting statistics).
        seconds_per_epoch: Machine label -> mean over runs of the median training-epoch time on that machine.
        machines: Machine label -> full description, for the machines its runs used.
        invocations: Invocation ids of its runs (one per start of accuracy.py).
        trainable_parameters: Parameters updated by training.
    """

    row: str
    n: int
    expected: int
    one_pass: bool
    epochs: int
    metrics: dict[str, Stat]
    fit_seconds: float
    seconds_per_epoch: dict[str, float]
    machines: dict[str, str]
    invocations: set[str] = field(default_factory=set)
    trainable_parameters: int = 0


def run_key(run: dict) -> tuple:
    """The identity of a run: a rerun with the same key replaces the stored record."""
    return tuple(run[name] for name in KEY_FIELDS)


def migrate(store: dict) -> dict:
    """Bring a store to the current layout: ``runs``, and the earlier benchmark's ``results`` under ``legacy``.

    Args:
        store: The parsed JSON (changed in place).

    Returns:
        dict: ``{"runs": [...], "legacy": {...}}`` (``legacy`` only when there were earlier records).
    """
    store.setdefault("runs", [])
    if "results" in store:  # the earlier benchmark's single list of one-seed rows
        store["legacy"] = {"note": LEGACY_NOTE, "results": store.pop("results")}
    return store


def load(path: Path) -> dict:
    """Read the results store (see :func:`migrate`); an empty store when the file does not exist."""
    return migrate(json.loads(path.read_text()) if path.exists() else {})


def save(path: Path, store: dict) -> None:
    """Write the store atomically: an interrupted write never leaves a truncated file.

    Each run is one line (its per-image scores are thousands of values, one line each when indented), so a new run
    adds one line to the file's history.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = "[\n    " + ",\n    ".join(json.dumps(run) for run in store["runs"]) + "\n  ]"
    placeholder = json.dumps({key: "\0runs" if key == "runs" else value for key, value in store.items()}, indent=2)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(placeholder.replace(json.dumps("\0runs"), runs, 1) + "\n")
    os.replace(temporary, path)


def merge_run(path: Path, run: dict) -> dict:
    """Add one finished run to the store on disk, replacing an earlier run with the same key.

    The store is re-read right before writing, so runs written meanwhile by other processes are kept.

    Args:
        path: ``accuracy.json``.
        run: The run record (must have the fields of ``KEY_FIELDS``).

    Returns:
        dict: The store as written.
    """
    store = load(path)
    store["runs"] = [stored for stored in store["runs"] if run_key(stored) != run_key(run)] + [run]
    save(path, store)
    return store


def machine_label(machine: dict) -> str:
    """Short name of the machine a run used, e.g. ``CPU, 2 cores`` or ``GPU NVIDIA H200``."""
    if machine.get("device") == "cuda":
        return f"GPU {machine.get('gpu', '?')}"
    return f"CPU, {machine.get('cpu_cores', '?')} cores"


def machine_description(machine: dict) -> str:
    """Full description of a machine (CPU model and cores, GPU, torch, OS)."""
    parts = [f"{machine.get('cpu', 'unknown CPU')} ({machine.get('cpu_cores', '?')} cores)"]
    if machine.get("device") == "cuda":
        parts.append(f"GPU {machine.get('gpu', '?')}")
    parts.append(f"torch {machine.get('torch', '?')}")
    parts.append(machine.get("platform", "?"))
    return ", ".join(parts)


def in_protocol(run: dict, protocol: str, epochs: int) -> bool:
    """Whether a run belongs in the tables: current protocol, and the protocol's epochs unless it is one pass."""
    return run.get("protocol") == protocol and (run.get("one_pass", False) or run.get("epochs") == epochs)


def summarise(runs: Iterable[dict], protocol: str, epochs: int, seeds: int) -> dict[str, dict[str, RowSummary]]:
    """Group the runs of the current protocol by set and row and summarise each group.

    Args:
        runs: Run records.
        protocol: Current protocol id; runs of other protocols are left out.
        epochs: The protocol's epochs; trained runs with other epoch counts are left out.
        seeds: Seeds the protocol asks for per trained row.

    Returns:
        dict[str, dict[str, RowSummary]]: Set -> row -> summary.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        if in_protocol(run, protocol, epochs):
            groups.setdefault((run["set"], run["row"]), []).append(run)
    summaries: dict[str, dict[str, RowSummary]] = {}
    for (set_name, row), group in groups.items():
        one_pass = all(run.get("one_pass", False) for run in group)
        names = {name for run in group for name in run["metrics"] if name in METRICS}
        metrics = {
            name: stat([run["metrics"][name] for run in group if name in run["metrics"]], deterministic=one_pass)
            for name in METRICS
            if name in names
        }
        per_machine: dict[str, list[float]] = {}
        machines = {}
        for run in group:
            label = machine_label(run.get("machine", {}))
            machines[label] = machine_description(run.get("machine", {}))
            if run.get("seconds_per_epoch") is not None:
                per_machine.setdefault(label, []).append(run["seconds_per_epoch"])
        summaries.setdefault(set_name, {})[row] = RowSummary(
            row=row,
            n=len(group),
            expected=1 if one_pass else seeds,
            one_pass=one_pass,
            epochs=group[0]["epochs"],
            metrics=metrics,
            fit_seconds=statistics.fmean(run["fit_seconds"] for run in group),
            seconds_per_epoch={label: statistics.fmean(times) for label, times in per_machine.items()},
            machines=machines,
            invocations={run.get("invocation", "") for run in group},
            trainable_parameters=group[-1].get("trainable_parameters", 0),
        )
    return summaries


def ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
    """Names in the given order, unknown names after them in alphabetical order."""
    position = {name: index for index, name in enumerate(order)}
    return sorted(names, key=lambda name: (position.get(name, len(order)), name))


def best(rows: dict[str, RowSummary], metric: str) -> float | None:
    """The highest mean of a metric over the rows, rounded as the table shows it."""
    means = [round(summary.metrics[metric].mean, DIGITS) for summary in rows.values() if metric in summary.metrics]
    return max(means) if means else None


def format_stat(value: Stat, bold: bool) -> str:
    """``mean ± std`` (just the mean for one run), in bold for the best row."""
    text = f"{value.mean:.{DIGITS}f}"
    if value.n >= 2 and value.std is not None:
        text += f" ± {value.std:.{DIGITS}f}"
    return f"**{text}**" if bold else text


def time_ratio(summary: RowSummary, reference: RowSummary | None) -> tuple[float | None, bool]:
    """Training time per epoch relative to the reference row on the same set and machine.

    Args:
        summary: The row.
        reference: The reference row (anomalib Stfpm) on the same set, if it ran.

    Returns:
        tuple[float | None, bool]: The ratio (``None`` when the two have no machine in common), and whether the
        two rows ran in one invocation of the benchmark (same load from other jobs).
    """
    if reference is None or summary.one_pass:
        return None, False
    common = [label for label in summary.seconds_per_epoch if label in reference.seconds_per_epoch]
    if not common:
        return None, False
    label = sorted(common)[0]  # usually the only one
    ratio = summary.seconds_per_epoch[label] / reference.seconds_per_epoch[label]
    return ratio, bool(summary.invocations & reference.invocations)


def base_row(row: str, rows: Iterable[str]) -> str | None:
    """The row a variant is compared against: the longest other row name that ``row`` starts with, plus a space."""
    bases = [other for other in rows if other != row and row.startswith(other + " ")]
    return max(bases, key=len) if bases else None


def compare(
    a_name: str,
    a: dict[str, Stat],
    b_name: str,
    b: dict[str, Stat],
    component: str | None = None,
    b_rows: dict[str, str] | None = None,
) -> str:
    """One line comparing row ``a`` with row ``b`` on every metric both report.

    Args:
        a_name: Name shown for ``a``.
        a: Metric -> statistics of the row whose margin is reported (``a - b``).
        b_name: Name shown for ``b``.
        b: Metric -> statistics of the row compared against.
        component: For an ablation (``b`` is ``a`` without a component): the component, so that the line says
            whether it helps or hurts.
        b_rows: Metric -> the row behind ``b``'s value, when ``b`` gathers several rows (the best anchor).

    Returns:
        str: A Markdown list item.
    """
    ahead, behind, level, unknown = [], [], [], []
    for metric, label in METRICS.items():
        if metric not in a or metric not in b:
            continue
        x, y = a[metric], b[metric]
        spread = "?" if x.std is None or y.std is None else f"{x.std + y.std:.{DIGITS}f}"
        source = f"{b_rows[metric]}: " if b_rows else ""
        text = f"{label} ({source}{x.mean - y.mean:+.{DIGITS}f}, spread {spread})"
        if x.std is None or y.std is None:
            unknown.append(text)
        elif not significant(x, y):
            level.append(text)
        elif x.mean > y.mean:
            ahead.append(text)
        else:
            behind.append(text)
    if component is None:
        words = (f"better than {b_name}", f"worse than {b_name}", "no difference beyond the seed spread")
    else:
        words = (f"{component} helps", f"{component} hurts", f"{component}: no effect beyond the seed spread")
    parts = [f"**{words[0]}** on {', '.join(ahead)}"] if ahead else []
    parts += [f"**{words[1]}** on {', '.join(behind)}"] if behind else []
    parts += [f"{words[2]} on {', '.join(level)}"] if level else []
    parts += [f"undetermined (fewer than 2 seeds) on {', '.join(unknown)}"] if unknown else []
    return f"- {a_name} vs {b_name}: " + "; ".join(parts)


def comparisons(rows: dict[str, RowSummary], order: Sequence[str], anchors: set[str]) -> list[str]:
    """The claims the table supports, one line per pair of rows.

    - each variant (``"<row> <variant>"``) against its row; for ``"<row> no-<component>"`` the line says whether
      the component helps (the row beats the variant by more than their spreads) or hurts;
    - each of our main rows (not an anchor, not a variant) against every later main row;
    - each main row against the best anchor of each metric.

    Args:
        rows: Row -> summary on one set.
        order: Row order.
        anchors: Rows that are baselines (anomalib models).

    Returns:
        list[str]: Markdown list items.
    """
    names = ordered(rows, order)
    metrics = {name: rows[name].metrics for name in names}
    lines = []
    for name in names:
        base = base_row(name, names)
        if base is None or name in anchors:
            continue
        variant = name[len(base) + 1 :]
        if variant.startswith("no-"):
            lines.append(compare(base, metrics[base], name, metrics[name], component=variant[3:]))
        else:
            lines.append(compare(name, metrics[name], base, metrics[base]))
    main = [name for name in names if name not in anchors and base_row(name, names) is None]
    lines += [compare(b, metrics[b], a, metrics[a]) for i, a in enumerate(main) for b in main[i + 1 :]]
    top = {}
    for metric in METRICS:
        present = [name for name in names if name in anchors and metric in metrics[name]]
        if present:
            top[metric] = max(present, key=lambda name: metrics[name][metric].mean)
    if top:
        best_anchor = {metric: metrics[name][metric] for metric, name in top.items()}
        lines += [compare(name, metrics[name], "the best anchor", best_anchor, b_rows=top) for name in main]
    return lines


def set_table(
    rows: dict[str, RowSummary],
    order: Sequence[str],
    time_reference: str,
) -> list[str]:
    """The Markdown table of one set (metric columns only for metrics some row reports)."""
    metrics = [metric for metric in METRICS if any(metric in summary.metrics for summary in rows.values())]
    header = ["row", "seeds", "epochs", *(METRICS[metric] for metric in metrics)]
    header += ["fit s", "s / epoch", f"epoch time / {time_reference}", "trainable params", "ran on"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|" + "---:|" * (len(header) - 4) + "---|"]
    tops = {metric: best(rows, metric) for metric in metrics}
    reference = rows.get(time_reference)
    for name in ordered(rows, order):
        summary = rows[name]
        cells = [name, f"{summary.n}/{summary.expected}", "1 pass" if summary.one_pass else str(summary.epochs)]
        for metric in metrics:
            value = summary.metrics.get(metric)
            cells.append("—" if value is None else format_stat(value, round(value.mean, DIGITS) == tops[metric]))
        cells.append(f"{summary.fit_seconds:.0f}")
        per_epoch = [f"{seconds:.1f}" for seconds in summary.seconds_per_epoch.values()]
        cells.append("—" if summary.one_pass or not per_epoch else " / ".join(per_epoch))
        ratio, together = time_ratio(summary, reference)
        cells.append("—" if ratio is None else f"{ratio:.2f}" + ("" if together else " ✱"))
        cells.append(f"{summary.trainable_parameters:,}")
        cells.append(" + ".join(sorted(summary.machines)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def excluded_runs(runs: Iterable[dict], protocol: str, epochs: int) -> list[str]:
    """Lines naming the stored runs that are not in the tables (other protocol or other epochs)."""
    counts: dict[tuple[str, str, str, int], int] = {}
    for run in runs:
        if not in_protocol(run, protocol, epochs):
            key = (run.get("protocol", "?"), run["row"], run["set"], run["epochs"])
            counts[key] = counts.get(key, 0) + 1
    return [
        f"- {row} on {set_name}: {count} run(s), protocol `{run_protocol}`, {run_epochs} epoch(s)"
        for (run_protocol, row, set_name, run_epochs), count in sorted(counts.items())
    ]


def render_markdown(
    store: dict,
    *,
    protocol: str,
    epochs: int,
    seeds: int,
    set_order: Sequence[str],
    row_order: Sequence[str],
    anchors: set[str],
    time_reference: str,
    description: str,
    plot_name: str | None = None,
) -> str:
    """The results page: protocol, one table per set, the supported claims, machines, commands, what was left out.

    Args:
        store: The results store (see :func:`load`).
        protocol: Current protocol id.
        epochs: The protocol's training epochs.
        seeds: Seeds per trained row.
        set_order: Order of the sets.
        row_order: Order of the rows.
        anchors: Baseline rows.
        time_reference: Row the training time per epoch is compared with.
        description: Paragraph describing the protocol.
        plot_name: File name of the plot, linked when given.

    Returns:
        str: Markdown.
    """
    runs = store.get("runs", [])
    summaries = summarise(runs, protocol, epochs, seeds)
    lines = ["# Accuracy on real data", "", description, ""]
    if plot_name is not None and summaries:
        lines += [f"![image and pixel AUROC per set, mean ± std over seeds]({plot_name})", ""]
    lines += [
        "Each cell is mean ± sample standard deviation over the seeds run (seeds column: finished / planned); the "
        "best mean of each column is in bold. `s / epoch` is the median time of one training epoch of a run "
        f"(mean over its seeds); `epoch time / {time_reference}` divides it by {time_reference}'s on the "
        "same set and machine (✱: the two rows never ran in the same invocation, so other jobs on the machine may "
        "have loaded them differently). `fit s` also includes fitting statistics or memory banks and writing the "
        "checkpoint.",
        "",
    ]
    if not summaries:
        lines += ["No run of the current protocol has finished yet.", ""]
    for set_name in ordered(summaries, set_order):
        rows = summaries[set_name]
        lines += [f"## {set_name}", "", *set_table(rows, row_order, time_reference), ""]
        claims = comparisons(rows, row_order, anchors)
        if claims:
            lines += [
                "A difference counts only when the margin exceeds the sum of the two rows' standard deviations "
                "(`significant` in benchmarks/accuracy_report.py).",
                "",
                *claims,
                "",
            ]
    machines = sorted(
        {item for rows in summaries.values() for summary in rows.values() for item in summary.machines.items()}
    )
    if machines:
        lines += ["## Machines", "", *[f"- {label}: {text}" for label, text in machines], ""]
    commands = sorted({run["command"] for run in runs if in_protocol(run, protocol, epochs)})
    if commands:
        lines += ["## Commands that produced these runs", "", *[f"- `{command}`" for command in commands], ""]
    excluded = excluded_runs(runs, protocol, epochs)
    legacy = store.get("legacy", {}).get("results", [])
    if excluded or legacy:
        lines += ["## Not in these tables (kept in accuracy.json)", ""]
        lines += excluded
        if legacy:
            legacy_rows = ", ".join(sorted({str(record.get("model", "?")) for record in legacy}))
            legacy_sets = ", ".join(sorted({str(record.get("category", "?")) for record in legacy}))
            lines.append(
                f"- `legacy`: {len(legacy)} records ({legacy_rows} on {legacy_sets}). {store['legacy'].get('note', '')}"
            )
        lines.append("")
    return "\n".join(lines)


def plot(
    summaries: dict[str, dict[str, RowSummary]],
    path: Path,
    set_order: Sequence[str],
    row_order: Sequence[str],
) -> bool:
    """Per-set grouped horizontal bars of image AUROC and pixel AUROC (where present), error bars = std.

    Args:
        summaries: Set -> row -> summary (see :func:`summarise`).
        path: PNG to write.
        set_order: Order of the panels.
        row_order: Order of the bars.

    Returns:
        bool: Whether a plot was written (``False`` when there is nothing to plot).
    """
    sets = ordered(summaries, set_order)
    if not sets:
        return False
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    rows = ordered({row for name in sets for row in summaries[name]}, row_order)
    height = 0.38
    inches = 0.42 * len(rows) + 1.9
    figure, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets) + 2.2, inches), sharey=True, squeeze=False)
    colours = {"image_AUROC": "#3b75af", "pixel_AUROC": "#ef8636"}
    for axis, set_name in zip(axes[0], sets, strict=True):
        low = 1.0
        present = [m for m in PLOTTED if any(m in summary.metrics for summary in summaries[set_name].values())]
        offsets = [height * (index - (len(present) - 1) / 2) for index in range(len(present))]
        for offset, metric in zip(offsets, present, strict=True):
            positions, means, errors = [], [], []
            for index, row in enumerate(rows):
                summary = summaries[set_name].get(row)
                if summary is None or metric not in summary.metrics:
                    continue
                value = summary.metrics[metric]
                positions.append(index + offset)
                means.append(value.mean)
                errors.append(value.std or 0.0)
                low = min(low, value.mean - (value.std or 0.0))
            if positions:
                axis.barh(
                    positions, means, height=height, xerr=errors, color=colours[metric], capsize=2,
                    label=METRICS[metric], error_kw={"elinewidth": 1},
                )  # fmt: skip
        span = max(1.0 - low, 0.01)
        axis.set_xlim(max(0.0, low - 0.15 * span), 1.0 + 0.02 * span)
        axis.set_title(set_name)
        axis.grid(axis="x", alpha=0.3)
        axis.tick_params(axis="x", labelsize=8)
    axes[0][0].set_yticks(range(len(rows)), rows, fontsize=8)
    axes[0][0].invert_yaxis()
    handles, labels = [], []
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    figure.suptitle("AUROC per set (mean ± std over seeds; x axis zoomed per set)", fontsize=10)
    figure.tight_layout(rect=(0, 0.4 / inches, 1, 1))  # 0.4 inch below the panels for the legend
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
