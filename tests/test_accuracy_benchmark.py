"""The accuracy benchmark's bookkeeping: statistics, significance, tables, plot, results store, command line.

No training here: the runs are synthetic records. ``benchmarks/accuracy.py`` itself runs the models.
"""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy
import accuracy_report as report

CONFIRM = accuracy.PROTOCOLS["confirm"]
PROTOCOL, EPOCHS = CONFIRM.id, CONFIRM.epochs
CPU = {"device": "cpu", "cpu": "Test CPU", "cpu_cores": 2, "gpu": None, "torch": "2.x", "platform": "Linux"}


def make_run(row, set_name, seed, metrics, seconds_per_epoch=10.0, epochs=EPOCHS, one_pass=False, invocation="a"):
    return {
        "protocol": PROTOCOL,
        "row": row,
        "set": set_name,
        "seed": seed,
        "epochs": 1 if one_pass else epochs,
        "one_pass": one_pass,
        "metrics": metrics,
        "fit_seconds": 100.0,
        "seconds_per_epoch": seconds_per_epoch,
        "epoch_seconds": [seconds_per_epoch],
        "trainable_parameters": 0 if one_pass else 1000,
        "machine": CPU,
        "command": "python benchmarks/accuracy.py --suite dev",
        "invocation": invocation,
        "finished": "2026-01-01T00:00:00+00:00",
    }


def mvtec(image, pixel, aupro=0.9, f1=0.95):
    return {"image_AUROC": image, "image_F1Max": f1, "pixel_AUROC": pixel, "pixel_AUPRO": aupro}


def synthetic_store() -> dict:
    """bottle: BiDirMSKD beats its no-attention ablation beyond the spread on pixel AUROC, not on image AUROC;
    brain_mri (image metrics only): a trained row with one seed so far. Plus a smoke run and legacy records."""
    runs = []
    for seed, (pixel, ablated) in enumerate([(0.990, 0.970), (0.992, 0.971), (0.994, 0.972)]):
        runs.append(make_run("BiDirMSKD", "bottle", seed, mvtec(0.90 + 0.02 * seed, pixel), seconds_per_epoch=30.0))
        runs.append(make_run("BiDirMSKD no-attention", "bottle", seed, mvtec(0.91 + 0.01 * seed, ablated)))
        runs.append(make_run("anomalib Stfpm", "bottle", seed, mvtec(0.80, 0.95 + 0.001 * seed)))
    runs.append(make_run("anomalib Padim", "bottle", 0, mvtec(0.85, 0.98), one_pass=True))
    runs.append(make_run("BiDirMSKD", "brain_mri", 0, {"image_AUROC": 0.75, "image_F1Max": 0.80}))
    runs.append(make_run("anomalib Padim", "brain_mri", 0, {"image_AUROC": 0.70, "image_F1Max": 0.78}, one_pass=True))
    runs.append(make_run("MTHF", "bottle", 0, mvtec(0.5, 0.5), epochs=1))  # smoke run: other epoch count
    legacy = [{"model": "BiDirMSKD", "category": "bottle", "image_AUROC": 1.0, "command": "old"}]
    return {"runs": runs, "results": legacy}


def render(store: dict) -> str:
    path_free = report.migrate(store) if hasattr(report, "load_from_dict") else store
    return report.render_markdown(
        path_free,
        protocol=PROTOCOL,
        epochs=EPOCHS,
        seeds=3,
        set_order=list(accuracy.SETS),
        row_order=list(accuracy.ROWS),
        anchors=accuracy.ANCHORS,
        time_reference=accuracy.TIME_REFERENCE,
        description="Protocol text.",
        plot_name="accuracy.png",
    )


def table_line(markdown: str, set_name: str, row: str) -> str:
    section = markdown.split(f"## {set_name}\n", 1)[1].split("\n## ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith(f"| {row} |"))


# --- statistics ---------------------------------------------------------------------------------------------


def test_stat_is_mean_and_sample_std():
    value = report.stat([0.90, 0.92, 0.94])
    assert value.mean == pytest.approx(0.92)
    assert value.std == pytest.approx(0.02)  # sample std (n - 1); the population std would be 0.0163
    assert value.n == 3


def test_stat_of_one_run_has_no_spread_unless_deterministic():
    assert report.stat([0.9]).std is None
    assert report.stat([0.9], deterministic=True).std == 0.0


def test_significant_needs_margin_above_sum_of_stds():
    a = report.Stat(mean=0.95, std=0.01, n=3)
    assert report.significant(a, report.Stat(mean=0.92, std=0.01, n=3))  # 0.03 > 0.02
    assert not report.significant(a, report.Stat(mean=0.935, std=0.01, n=3))  # 0.015 <= 0.02
    assert not report.significant(a, report.Stat(mean=0.93, std=0.01, n=3))  # 0.02 is not more than 0.02
    assert report.significant(report.Stat(0.99, 0.0, 1), report.Stat(0.98, 0.0, 1))  # two deterministic rows
    assert not report.significant(a, report.Stat(mean=0.5, std=None, n=1))  # unknown spread: no claim


# --- Markdown -----------------------------------------------------------------------------------------------


def test_table_shows_mean_std_seed_count_and_bold_best():
    markdown = render(report.migrate(synthetic_store()))
    line = table_line(markdown, "bottle", "BiDirMSKD")
    assert "| 3/3 | 10 |" in line
    assert "0.9200 ± 0.0200" in line  # image AUROC
    assert "**0.9920 ± 0.0020**" in line  # best pixel AUROC in bold
    padim = table_line(markdown, "bottle", "anomalib Padim")
    assert "| 1/1 | 1 pass |" in padim
    assert "0.9800 |" in padim and "± " not in padim.split("|")[6]  # one deterministic run: no ± shown
    stfpm = table_line(markdown, "bottle", "anomalib Stfpm")
    assert "**" not in stfpm.split("|")[6]  # pixel AUROC of Stfpm is not the best


def test_ties_for_best_are_all_bold():
    markdown = render(report.migrate(synthetic_store()))
    assert "**0.9200 ± 0.0200**" in table_line(markdown, "bottle", "BiDirMSKD")
    assert "**0.9200 ± 0.0100**" in table_line(markdown, "bottle", "BiDirMSKD no-attention")


def test_component_helps_only_beyond_the_spread():
    lines = render(report.migrate(synthetic_store())).splitlines()
    claim = next(line for line in lines if line.startswith("- BiDirMSKD vs BiDirMSKD no-attention"))
    helps, rest = claim.split("**attention helps** on ", 1)[1].split(";", 1)
    assert "pixel AUROC (+0.0210" in helps  # 0.021 > 0.002 + 0.001
    assert "image AUROC" not in helps
    assert "no effect beyond the seed spread on image AUROC (" in rest


def test_partial_row_is_marked_and_makes_no_claim():
    markdown = render(report.migrate(synthetic_store()))
    line = table_line(markdown, "brain_mri", "BiDirMSKD")
    assert "| 1/3 |" in line and "| **0.7500** |" in line
    section = markdown.split("## brain_mri\n", 1)[1]
    claim = next(line for line in section.splitlines() if line.startswith("- BiDirMSKD vs the best anchor"))
    assert "undetermined (fewer than 2 seeds) on image AUROC (anomalib Padim: +0.0500, spread ?)" in claim
    assert "better" not in claim and "worse" not in claim


def test_sets_without_masks_have_image_columns_only():
    markdown = render(report.migrate(synthetic_store()))
    header = markdown.split("## brain_mri\n", 1)[1].strip().splitlines()[0]
    assert "image AUROC" in header and "image F1max" in header
    assert "pixel AUROC" not in header and "AUPRO" not in header


def test_epoch_time_ratio_against_stfpm():
    markdown = render(report.migrate(synthetic_store()))
    cells = [cell.strip() for cell in table_line(markdown, "bottle", "BiDirMSKD").split("|")]
    assert cells[9] == "30.0"  # s / epoch
    assert cells[10] == "3.00"  # 30 s vs Stfpm's 10 s, same machine and invocation
    padim = [cell.strip() for cell in table_line(markdown, "bottle", "anomalib Padim").split("|")]
    assert padim[9] == padim[10] == "—"  # one pass: no epochs


def test_ratio_from_separate_invocations_is_marked():
    store = synthetic_store()
    for run in store["runs"]:
        if run["row"] == "anomalib Stfpm":
            run["invocation"] = "b"
    cells = table_line(render(report.migrate(store)), "bottle", "BiDirMSKD").split("|")
    assert cells[10].strip() == "3.00 ✱"


def test_dropped_records_are_named():
    markdown = render(report.migrate(synthetic_store()))
    dropped = markdown.split("## Not in these tables", 1)[1]
    assert "MTHF on bottle: 1 run(s)" in dropped and "1 epoch(s)" in dropped
    assert "`legacy`: 1 records (BiDirMSKD on bottle)" in dropped
    assert "| MTHF |" not in markdown  # the smoke run is not in a table


# --- store --------------------------------------------------------------------------------------------------


def test_merge_keeps_finished_runs_replaces_reruns_and_moves_legacy(tmp_path):
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps({"results": [{"model": "old", "category": "bottle"}]}))
    first = make_run("BiDirMSKD", "bottle", 0, mvtec(0.9, 0.9))
    report.merge_run(path, first)
    report.merge_run(path, make_run("BiDirMSKD", "bottle", 1, mvtec(0.9, 0.9)))
    report.merge_run(path, make_run("BiDirMSKD", "bottle", 0, mvtec(0.8, 0.8)))  # rerun of seed 0
    stored = json.loads(path.read_text())
    assert sorted(run["seed"] for run in stored["runs"]) == [0, 1]
    assert next(run for run in stored["runs"] if run["seed"] == 0)["metrics"]["image_AUROC"] == 0.8
    assert stored["legacy"]["results"] == [{"model": "old", "category": "bottle"}]
    assert "results" not in stored
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_plot_is_written(tmp_path):
    store = report.migrate(synthetic_store())
    summaries = report.summarise(store["runs"], PROTOCOL, EPOCHS, 3)
    path = tmp_path / "accuracy.png"
    assert report.plot(summaries, path, list(accuracy.SETS), list(accuracy.ROWS))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not report.plot({}, tmp_path / "empty.png", [], [])


def test_render_only_writes_every_protocols_page_and_plot_from_json(tmp_path):
    store = synthetic_store()
    store["runs"].append(
        make_run("BiDirMSKD", "ucsd_ped1", 0, {"image_AUROC": 0.61}, epochs=6) | {"protocol": "screen-1"}
    )
    (tmp_path / "accuracy.json").write_text(json.dumps(store))
    assert accuracy.main(["--render-only", "--results", str(tmp_path)]) == 0
    markdown = (tmp_path / "accuracy.md").read_text()
    assert "## bottle" in markdown and "## brain_mri" in markdown and "ucsd_ped1" not in markdown.split("\n## ")[1]
    assert "![image and pixel AUROC" in markdown
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    screen = (tmp_path / "accuracy_screen.md").read_text()
    assert "Protocol `screen-1`" in screen and "## ucsd_ped1" in screen and "0.6100" in screen
    assert "## bottle" not in screen  # confirm runs stay out of the screen page


# --- command line -------------------------------------------------------------------------------------------


def test_confirm_runs_every_row_on_the_five_sets_with_three_seeds():
    args = accuracy.parse_args(["--suite", "dev"])
    assert args.protocol is CONFIRM
    assert args.sets == ["bottle", "hazelnut_toy", "brain_mri", "ucsd_ped2", "ucsd_ped1"]
    assert args.rows == accuracy.ROW_ORDER
    assert args.seeds == [0, 1, 2]
    assert args.epochs == 10
    jobs = accuracy.plan(args)
    trained = len(accuracy.ROW_ORDER) - len(accuracy.ONE_PASS_ROWS)
    assert len(jobs) == 5 * (3 * trained + len(accuracy.ONE_PASS_ROWS))
    assert [seed for row, set_name, seed in jobs if row == "anomalib Padim"] == [0] * 5
    assert jobs[0][2] == 0 and jobs[-1][2] == 2  # seed by seed: every set gets seed 0 first


def test_screen_is_one_seed_fewer_epochs_and_strided_video_frames():
    args = accuracy.parse_args(["--protocol", "screen", "--sets", "ucsd_ped2"])
    assert (args.protocol.id, args.seeds, args.epochs) == ("screen-1", [0], 6)
    assert args.protocol.train_frame_stride > CONFIRM.train_frame_stride and args.protocol.test_frame_stride > 1
    assert CONFIRM.test_frame_stride == 1  # confirm scores every test frame


def test_subset_arguments():
    args = accuracy.parse_args(
        ["--sets", "hazelnut_toy", "--rows", "anomalib Padim", "BiDirMSKD +prior", "--seeds", "1"]
    )
    assert (args.sets, args.rows, args.seeds) == (["hazelnut_toy"], ["anomalib Padim", "BiDirMSKD +prior"], [1])
    assert accuracy.plan(args) == [("anomalib Padim", "hazelnut_toy", 0), ("BiDirMSKD +prior", "hazelnut_toy", 1)]


def test_retest_rows_join_their_base_rows_training():
    args = accuracy.parse_args(
        ["--sets", "brain_mri", "--rows", "BiDirMSKD", "BiDirMSKD +prior max", "anomalib Stfpm", "--seeds", "0"]
    )
    assert accuracy.trainings(accuracy.plan(args)) == [
        ("BiDirMSKD +prior", "brain_mri", 0, ["BiDirMSKD", "BiDirMSKD +prior max"]),
        ("anomalib Stfpm", "brain_mri", 0, []),
    ]
    for name, retest in accuracy.RETESTS.items():
        assert retest.base in accuracy.ROWS and retest.base != name


@pytest.mark.parametrize(
    "argv",
    [["--sets", "carpet"], ["--rows", "Nope"], ["--seeds", "-1"], ["--protocol", "dev"], ["--suite", "full"]],
)
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        accuracy.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_resume_skips_stored_runs():
    args = accuracy.parse_args(["--sets", "bottle", "--rows", "BiDirMSKD", "anomalib Padim", "--seeds", "0", "1"])
    stored = [
        make_run("BiDirMSKD", "bottle", 0, {}),
        make_run("anomalib Padim", "bottle", 0, {}, one_pass=True),
        make_run("BiDirMSKD", "bottle", 1, {}, epochs=2),  # other epochs: not done
    ]
    assert accuracy.pending(accuracy.plan(args), stored, CONFIRM) == [("BiDirMSKD", "bottle", 1)]


def test_combined_change_applies_in_order_and_undoes_in_reverse():
    log = []

    def change(name):
        def apply(module):
            log.append(f"+{name}")
            return lambda: log.append(f"-{name}")

        return apply

    undo = accuracy.combined(change("a"), change("b"))(object())
    assert log == ["+a", "+b"]
    undo()
    assert log == ["+a", "+b", "-b", "-a"]


def test_resume_retests_a_stored_base_run_from_its_checkpoint_instead_of_training(tmp_path, monkeypatch):
    """With --resume, a re-test whose base run is stored gets that record (run() then loads the checkpoint)."""
    monkeypatch.setitem(accuracy.SETS, "brain_mri", dataclasses.replace(accuracy.SETS["brain_mri"], folder=tmp_path))
    base = make_run("BiDirMSKD +prior", "brain_mri", 0, {"image_AUROC": 0.88})
    report.merge_run(tmp_path / "accuracy.json", base)
    calls = []

    def fake_run(protocol, row, set_name, seed, accelerator, workdir, retests, stored):
        calls.append((row, list(retests), stored))
        return []

    monkeypatch.setattr(accuracy, "run", fake_run)
    monkeypatch.setattr(accuracy, "quiet", lambda: None)
    argv = ["--protocol", "confirm", "--sets", "brain_mri", "--rows", "BiDirMSKD", "anomalib Stfpm", "--seeds", "0"]
    accuracy.main([*argv, "--resume", "--results", str(tmp_path)])
    [(row, retests, stored), (anchor, _, anchor_stored)] = calls
    assert (row, retests, stored["metrics"]) == ("BiDirMSKD +prior", ["BiDirMSKD"], {"image_AUROC": 0.88})
    assert anchor == "anomalib Stfpm" and anchor_stored is None
    calls.clear()
    accuracy.main([*argv, "--results", str(tmp_path)])  # without --resume everything is trained again
    assert [stored for _, _, stored in calls] == [None, None]


# --- metrics ------------------------------------------------------------------------------------------------


def test_metrics_rank_raw_scores_and_sets_without_masks_get_image_metrics_only():
    """Raw distances far above 1 (no normalisation in the protocol) must not be squashed into ties by a sigmoid."""
    import torch
    from anomalib.data import ImageBatch

    metrics = accuracy.evaluator(masks=False).test_metrics
    assert [metric.name for metric in metrics] == ["image_AUROC", "image_F1Max"]
    batch = ImageBatch(
        image=torch.zeros(4, 3, 8, 8),
        pred_score=torch.tensor([50.0, 60.0, 70.0, 80.0]),
        gt_label=torch.tensor([0, 0, 1, 1]),
    )
    for metric in metrics:
        metric.update(batch)
        assert metric.compute().item() == pytest.approx(1.0)
    assert [metric.name for metric in accuracy.evaluator(masks=True).test_metrics][2:] == ["pixel_AUROC", "pixel_AUPRO"]


# --- per-image scores, rescoring and the medical report -----------------------------------------------------


def test_score_recorder_keeps_raw_scores_labels_and_relative_paths(tmp_path):
    import torch
    from anomalib.data import ImageBatch

    recorder = accuracy.score_recorder(tmp_path)
    inside, outside = str(tmp_path / "test" / "good" / "a.png"), "/elsewhere/b.png"
    batch = ImageBatch(
        image=torch.zeros(2, 3, 8, 8),
        pred_score=torch.tensor([12.5, 3.25]),
        gt_label=torch.tensor([1, 0]),
        image_path=[inside, outside],
    )
    recorder.on_test_batch_end(None, None, batch, batch, 0)
    assert recorder.records == {
        "pred_score": [12.5, 3.25],
        "gt_label": [1, 0],
        "image_path": ["test/good/a.png", outside],
    }


def test_rescore_picks_stored_runs_without_scores_and_refuses_a_missing_checkpoint(tmp_path, monkeypatch, capsys):
    path = tmp_path / "accuracy.json"
    scored = make_run("BiDirMSKD", "brain_mri", 0, {"image_AUROC": 0.8}) | {"image_scores": {"pred_score": []}}
    for run in (scored, make_run("BiDirMSKD", "brain_mri", 1, {"image_AUROC": 0.7})):
        report.merge_run(path, run)
    calls = []

    def fake_rescore(protocol, row, set_name, seed, workdir, accelerator):
        calls.append((row, set_name, seed))
        scores = {"pred_score": [1.0], "gt_label": [1], "image_path": ["x"]}
        return {"image_scores": scores, "rescore_metrics": {"image_AUROC": 0.7 if seed == 1 else 0.5}}

    monkeypatch.setattr(accuracy, "rescore", fake_rescore)
    args = accuracy.parse_args(["--sets", "brain_mri", "--rows", "BiDirMSKD", "--seeds", "0", "1", "2", "--rescore"])
    assert accuracy.add_scores(args, path) == 0
    assert calls == [("BiDirMSKD", "brain_mri", 1)]  # seed 0 has scores, seed 2 never ran
    stored = {run["seed"]: run for run in report.load(path)["runs"]}
    assert stored[1]["image_scores"]["pred_score"] == [1.0] and stored[1]["metrics"] == {"image_AUROC": 0.7}

    report.merge_run(path, make_run("BiDirMSKD", "brain_mri", 2, {"image_AUROC": 0.9}))
    assert accuracy.add_scores(args, path) == 1  # the re-test gives no AUROC 0.9: its scores are not stored
    assert "image_scores" not in {run["seed"]: run for run in report.load(path)["runs"]}[2]
    assert "NOT STORED" in capsys.readouterr().out

    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        accuracy.rescore(CONFIRM, "BiDirMSKD", "brain_mri", 2, tmp_path / "nowhere", "cpu")


def test_medical_report_roc_finetune_verdicts_and_files(tmp_path):
    import signals_medical_report as medical
    from sklearn.metrics import roc_auc_score

    labels, scores = [0, 0, 1, 1, 1, 0], [0.1, 0.4, 0.35, 0.8, 0.4, 0.2]
    fpr, tpr = medical.roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert medical.auc(fpr, tpr) == pytest.approx(roc_auc_score(labels, scores))
    with pytest.raises(ValueError, match="both normal and abnormal"):
        medical.roc_curve([1, 1], [0.1, 0.2])

    def run(row, seed, auroc, one_pass=False):
        record = make_run(row, "brain_mri", seed, {"image_AUROC": auroc, "image_F1Max": 0.9}, one_pass=one_pass)
        scored = {"image_scores": {"pred_score": scores, "gt_label": labels, "image_path": ["p"] * 6}}
        return record | scored | {"protocol": medical.PROTOCOL}  # the report reads protocol dev-1's brain runs

    runs = [run("BiDirMSKD", s, a) for s, a in enumerate([0.80, 0.82, 0.84])]
    adapted = {"teacher_finetune": [{"steps": 40, "first_loss": 0.7, "last_loss": 0.3, "weight_shift": 0.01}]}
    runs += [run("BiDirMSKD +finetune", s, a) | adapted for s, a in enumerate([0.90, 0.91, 0.92])]  # beyond spread
    runs += [run("MTHF", s, a) for s, a in enumerate([0.80, 0.85, 0.90])]
    runs += [run("MTHF +finetune", s, a) for s, a in enumerate([0.82, 0.86, 0.90])]  # within the spread
    runs += [run("anomalib Padim", 0, 0.88, one_pass=True)]
    (tmp_path / "accuracy.json").write_text(json.dumps({"runs": runs}))
    signals = {
        "runs": [
            {"row": "Isolation Forest", "split": split, "seed": seed, "input": "series",
             "metrics": {"auroc": 0.8, "f1": 0.5, "accuracy": 0.7, "recall": 0.4}}
            | ({"scores": scores, "labels": labels} if split == "test" else {})
            for split in ("fold0", "test")
            for seed in (0, 1)
        ],
        "commands": ["python benchmarks/signals.py --rows 'Isolation Forest'"],
    }  # fmt: skip
    (tmp_path / "signals.json").write_text(json.dumps(signals))
    assert medical.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "signals_medical.md").read_text()
    verdicts = {line.split(" vs ")[0][2:]: line for line in text.splitlines() if " vs " in line and "spread" in line}
    assert "**fine-tuning helps**" in verdicts["BiDirMSKD +finetune"]
    assert "no difference beyond the seed spread" in verdicts["MTHF +finetune"]
    assert "BiDirMSKD reverse-only +finetune vs BiDirMSKD reverse-only: not both run yet" in text
    assert "| anomalib Padim | 1 pass | 0.8800 |" in text
    assert "- BiDirMSKD +finetune: 40 steps per teacher; synthetic-anomaly segmentation loss 0.700" in text
    assert "python benchmarks/signals.py --rows 'Isolation Forest'" in text
    data = json.loads((tmp_path / "signals_medical.json").read_text())
    assert sorted(data["mri"]["BiDirMSKD"]["roc"]) == ["0", "1", "2"]
    assert data["ecg"]["Isolation Forest"]["test"]["auroc"]["n"] == 2
    for name in ("signals_medical_mri_roc.png", "signals_medical_ecg_roc.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
