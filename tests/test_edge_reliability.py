"""`kd-ext infer` reliability (issues 11 and 20): no results lost on interruption, races, bad images or outputs.

Uses the small synthetic IRs and images of ``test_edge.py`` (no torch, no training). Each test names the
issue's case it covers. Issue 20's subprocess tests pause or slow down the CLI with a wrapper script of their own
(``PAUSED_CLI``, ``SLOW_DELETE_CLI``), so that a signal or a competing write lands at a known point without timing
guesses.
"""

import csv
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np
import pytest
from PIL import Image
from test_edge import SIZE, anomaly_ir, classifier_ir, sample_images, write_image

from kd_ext.cli import main
from kd_ext.edge import EdgeInputError, EdgeModel, EdgeModelError, load_image, score_folder
from kd_ext.edge import folder as edge_folder


@pytest.fixture
def ir(tmp_path: Path) -> Path:
    return anomaly_ir(tmp_path / "model" / "model.xml")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return sample_images(tmp_path / "images")


def previous_results(out: Path, files: int = 40) -> Path:
    """An output folder of an earlier run: its own results.json and many files."""
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"previous": True}))
    for index in range(files):
        (out / f"previous-{index:03d}.txt").write_text("earlier run")
    return out


def no_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any inference fail loudly, to show a check ran before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        msg = "inference started before the output checks"
        raise AssertionError(msg)

    monkeypatch.setattr(EdgeModel, "iter_predict", refuse)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width x height`` (decoding would fail; Pillow reads headers lazily)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


# Case 3: --overwrite never loses both the previous and the new results; symlinked --out.


def test_overwrite_interrupted_while_deleting_previous_keeps_new_results(
    ir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = previous_results(tmp_path / "out")
    real_rmtree = shutil.rmtree
    state = {"interrupted": False}

    def interrupted_rmtree(path: str | Path, *args: object, **kwargs: object) -> None:
        doomed = sorted(Path(path).rglob("previous-*.txt"))
        if doomed and not state["interrupted"]:
            state["interrupted"] = True
            for file in doomed[:10]:
                file.unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted_rmtree)
    assert main(["infer", str(ir), str(images), "--out", str(out), "--overwrite", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT: the new results are complete in" in err
    assert "nothing was left half-written" not in err
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    assert len(results["images"]) == 5
    assert not list(out.glob("previous-*"))
    (staging,) = tmp_path.glob(".out.partial-*")  # the rest of the previous results, named in the message
    assert str(staging) in err
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    score_folder(EdgeModel(ir), images, out, overwrite=True, progress=None)  # the next run removes it
    assert not list(tmp_path.glob(".out.partial-*"))


def test_overwrite_interrupted_before_new_results_are_in_keeps_previous(
    ir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = previous_results(tmp_path / "out")
    real_rename = os.rename

    def interrupted_rename(src: str | Path, dst: str | Path, *args: object, **kwargs: object) -> None:
        moving_new_results = Path(src).name == "new" or Path(src).name.startswith(".out.partial-")
        if Path(dst) == out and moving_new_results:
            raise KeyboardInterrupt
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", interrupted_rename)
    assert main(["infer", str(ir), str(images), "--out", str(out), "--overwrite", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted by SIGINT: {out} was not changed" in err
    assert json.loads((out / "results.json").read_text()) == {"previous": True}
    assert len(list(out.glob("previous-*.txt"))) == 40
    assert not list(tmp_path.glob(".out.partial-*"))


def test_symlinked_out_stays_a_link_and_receives_results(ir: Path, images: Path, tmp_path: Path) -> None:
    real = previous_results(tmp_path / "results_v1")
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    assert main(["infer", str(ir), str(images), "--out", str(link), "--overwrite", "--quiet"]) == 0
    assert link.is_symlink()
    assert Path(os.path.realpath(link)) == real
    assert json.loads((real / "results.json").read_text())["complete"] is True
    assert not list(real.glob("previous-*"))
    assert not list(tmp_path.glob(".*.partial-*"))
    empty = tmp_path / "empty_target"
    empty.mkdir()
    (tmp_path / "link2").symlink_to(empty)
    assert main(["infer", str(ir), str(images), "--out", str(tmp_path / "link2"), "--quiet"]) == 0
    assert (empty / "scores.csv").is_file()


# Case 4: an image too large for Pillow is skipped, not fatal.


def test_decompression_bomb_is_skipped_and_the_rest_scored(
    ir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    png_header_only(images / "g_huge.png", 20000, 20000)  # 400 MP: over Pillow's default limit
    report = score_folder(EdgeModel(ir), images, tmp_path / "out", progress=None)
    assert len(report.rows) == 5
    reasons = {row["image"]: row["reason"] for row in report.skipped}
    assert "decompression-bomb" in reasons["g_huge.png"]
    assert "--max-pixels" in reasons["g_huge.png"]
    # A lowered Pillow limit: the 48x48 image (2304 px) is over twice the limit, the 32x32 ones (1024 px) are
    # between the limit and twice it, where Pillow only warns (read, with a note; even with warnings as errors).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = score_folder(EdgeModel(ir), images, tmp_path / "out2", progress=None)
    skipped = {row["image"] for row in report.skipped}
    assert skipped == {"d_large.jpg", "f_corrupt.png", "g_huge.png"}
    assert len(report.rows) == 4
    assert all("Pillow warned" in row["notes"] for row in report.rows)


def test_max_pixels_option_skips_larger_images(
    ir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored even if main() fails
    limit = Image.MAX_IMAGE_PIXELS
    out = tmp_path / "out"
    assert main(["infer", str(ir), str(images), "--out", str(out), "--max-pixels", "2000", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 2
    skipped = json.loads((out / "results.json").read_text())["skipped"]
    assert skipped[0]["image"] == "d_large.jpg"
    assert "48x48 = 2304 pixels, over the limit of 2000" in skipped[0]["reason"]
    assert limit == Image.MAX_IMAGE_PIXELS  # the CLI restores Pillow's limit
    with pytest.raises(EdgeInputError, match="over the limit of 100"):
        load_image(images / "a_normal.png", (SIZE, SIZE), max_pixels=100)


# Case 6: file names that are not valid UTF-8.


def undecodable_names(folder: Path, image: bytes, not_an_image: bytes) -> Path:
    """A folder with an anomalous image and a non-image file named with bytes that are not valid UTF-8."""
    folder.mkdir()
    try:
        write_image(Path(os.fsdecode(os.path.join(os.fsencode(folder), image))), 200)
        Path(os.fsdecode(os.path.join(os.fsencode(folder), not_an_image))).write_bytes(b"not an image")
    except (OSError, UnicodeError) as error:
        pytest.skip(f"this file system does not take non-UTF-8 names: {error}")
    return folder


def test_undecodable_file_names_are_written_escaped(ir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = undecodable_names(tmp_path / "images", b"bad\xff.png", b"worse\xfe.png")
    write_image(folder / "good.png", 20)
    out = tmp_path / "out"
    assert main(["infer", str(ir), str(folder), "--out", str(out)]) == 0
    assert "skipped worse\\xfe.png" in capsys.readouterr().err
    csv_text = (out / "scores.csv").read_text(encoding="utf-8")
    assert "bad\\xff.png," in csv_text
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    row = next(row for row in results["images"] if row["image"] == "bad\\xff.png")
    assert row["label_name"] == "anomalous"
    assert row["mask"] == "masks/bad_xff.png"
    assert (out / row["mask"]).is_file()
    assert (out / row["overlay"]).is_file()
    assert results["skipped"][0]["image"] == "worse\\xfe.png"
    assert "worse\\xfe.png" in (out / "skipped.csv").read_text(encoding="utf-8")


# Case 8: conversion by the format's value range.


def picture() -> np.ndarray:
    """A grayscale 8-bit gradient whose maximum (160) is far from white, so stretching would show."""
    return np.linspace(10, 160, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint8)


def test_sixteen_bit_image_scores_like_its_eight_bit_copy(ir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    eight = picture()
    Image.fromarray(eight, mode="L").save(folder / "a_8bit.png")
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    sixteen.save(folder / "b_16bit.png")
    Image.fromarray(eight.astype(np.int32) * 257).save(folder / "c_32bit_int.tif")  # mode I, 16-bit values
    report = score_folder(EdgeModel(ir), folder, tmp_path / "out", progress=None)
    scores = {row["image"]: row["score"] for row in report.rows}
    # The same pixels after conversion, so the same score (tolerance: float32 rounding only).
    assert scores["b_16bit.png"] == pytest.approx(scores["a_8bit.png"], abs=1e-6)
    assert scores["c_32bit_int.tif"] == pytest.approx(scores["a_8bit.png"], abs=1e-6)
    notes = {row["image"]: row["notes"] for row in report.rows}
    assert "16-bit values scaled by 1/65535" in notes["b_16bit.png"]


def test_images_without_a_defined_range_are_skipped_with_reason(ir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(picture(), mode="L").save(folder / "a_8bit.png")
    Image.fromarray(picture().astype(np.float32) / 255).save(folder / "b_float.tif")
    Image.fromarray(picture().astype(np.int32) * 1000).save(folder / "c_32bit_int.tif")  # up to 160000
    report = score_folder(EdgeModel(ir), folder, tmp_path / "out", progress=None)
    assert [row["image"] for row in report.rows] == ["a_8bit.png"]
    reasons = {row["image"]: row["reason"] for row in report.skipped}
    assert "mode F (32-bit floating point) has no defined value range" in reasons["b_float.tif"]
    assert "outside the 16-bit range" in reasons["c_32bit_int.tif"]
    written = (tmp_path / "out" / "skipped.csv").read_text()
    assert written.startswith("image,reason")
    assert "b_float.tif" in written


# Case 9: IRs with a static batch.


def test_static_batch_pads_the_short_last_batch(ir: Path, images: Path, tmp_path: Path) -> None:
    static = EdgeModel(anomaly_ir(tmp_path / "b4.xml", batch=4))
    report = score_folder(static, images, tmp_path / "out", progress=None)  # 5 readable images: 4 + 1
    dynamic = score_folder(EdgeModel(ir), images, tmp_path / "out_dynamic", progress=None)
    assert [row["image"] for row in report.rows] == [row["image"] for row in dynamic.rows]
    assert [row["score"] for row in report.rows] == pytest.approx([row["score"] for row in dynamic.rows], abs=1e-6)
    one = static.predict(np.full((1, 3, SIZE, SIZE), 0.8, dtype=np.float32))
    assert one.pred_score.shape == (1,)
    assert one.anomaly_map.shape == (1, SIZE, SIZE)
    with pytest.raises(EdgeInputError, match=r"static batch of 4; got 5 images\. Pass at most 4"):
        static.predict(np.zeros((5, 3, SIZE, SIZE), dtype=np.float32))


# Case 10: SIGTERM cleans up like Ctrl-C; stale staging folders of stopped runs are removed.

SLOW_CLI = """
import sys, time
from kd_ext.edge import folder
original = folder.load_image
def slow(*args, **kwargs):
    time.sleep(0.05)
    return original(*args, **kwargs)
folder.load_image = slow
from kd_ext.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("signal_number", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_run_cleans_up(ir: Path, tmp_path: Path, signal_number: int, exit_code: int) -> None:
    folder = tmp_path / "images"
    for index in range(200):
        write_image(folder / f"{index:03d}.png", index)
    out = tmp_path / "out"
    command = [sys.executable, "-c", SLOW_CLI, "infer", str(ir), str(folder), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".out.partial-*/**/masks/*.png")) and process.poll() is None:
        assert time.monotonic() < deadline, "the run wrote no output within 60 s"
        time.sleep(0.05)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=60)
    assert process.returncode == exit_code, err
    name = signal.Signals(signal_number).name
    assert f"kd-ext infer: interrupted by {name}: nothing was written ({out} was not created)." in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def stopped_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def staging_of(out: Path, pid: int) -> Path:
    staging = out.parent / f".{out.name}.partial-{pid}"
    (staging / "new" / "masks").mkdir(parents=True)
    (staging / "new" / "masks" / "x.png").write_bytes(b"partial")
    (staging / edge_folder.STAGING_MARKER).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return staging


def test_stale_staging_of_a_stopped_process_is_removed(ir: Path, images: Path, tmp_path: Path) -> None:
    stale = staging_of(tmp_path / "out", stopped_pid())
    foreign = tmp_path / f".out.partial-{stopped_pid()}"  # same name pattern, no kd_ext marker: not ours, kept
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's file")  # an empty folder of that name would be removed
    score_folder(EdgeModel(ir), images, tmp_path / "out", progress=None)
    assert not stale.exists()
    assert foreign.is_dir()


def test_staging_of_a_running_process_is_kept(ir: Path, images: Path, tmp_path: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as running:
        try:
            live = staging_of(tmp_path / "out", running.pid)
            score_folder(EdgeModel(ir), images, tmp_path / "out", progress=None)
            assert live.is_dir()
        finally:
            running.kill()


def test_previous_results_moved_aside_by_a_killed_run_are_restored(ir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = staging_of(out, stopped_pid())
    previous_results(stale / "old")  # killed between moving the previous results aside and renaming the new in
    with pytest.raises(EdgeInputError, match="already exists"):
        score_folder(EdgeModel(ir), images, out, progress=None)
    assert json.loads((out / "results.json").read_text()) == {"previous": True}
    assert len(list(out.glob("previous-*.txt"))) == 40
    assert not stale.exists()


# Case 11: unusable --out and output-name collisions are found before inference (exit 2); IR-read messages.


def test_out_under_a_file_exits_2_before_inference(
    ir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    no_inference(monkeypatch)
    for out in (blocker / "out", blocker / "deeper" / "out"):
        assert main(["infer", str(ir), str(images), "--out", str(out)]) == 2
        assert f"{blocker} is a file, not a folder" in capsys.readouterr().err
    assert main(["infer", str(ir), str(images), "--out", str(blocker), "--overwrite"]) == 2  # never deletes a file
    assert f"--out {blocker} exists and is a file, not a folder" in capsys.readouterr().err
    assert blocker.read_text() == "a file"


def test_out_is_the_image_folder_exits_2(
    ir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    no_inference(monkeypatch)
    for out in (images, tmp_path):
        assert main(["infer", str(ir), str(images), "--out", str(out), "--overwrite"]) == 2
        assert "is, or contains, the image folder" in capsys.readouterr().err
    assert (images / "a_normal.png").is_file()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_exits_2_before_inference(
    ir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    previous_results(locked / "out")
    locked.chmod(0o555)
    (locked / "out").chmod(0o555)
    no_inference(monkeypatch)
    try:
        assert main(["infer", str(ir), str(images), "--out", str(locked / "new")]) == 2
        assert "Permission denied" in capsys.readouterr().err
        (locked).chmod(0o755)
        assert main(["infer", str(ir), str(images), "--out", str(locked / "out"), "--overwrite"]) == 2
        assert "no permission to write in it" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)
        (locked / "out").chmod(0o755)


def test_read_only_file_system_out_exits_2(ir: Path, images: Path, tmp_path: Path) -> None:
    # Holds for root too: a read-only mount refuses writes whatever the permissions (needs a mount namespace).
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("no mount namespace here (unshare -m needs root or user namespaces)")
    locked = tmp_path / "locked"
    locked.mkdir()
    mount_read_only = f"mount --bind '{locked}' '{locked}' && mount -o remount,bind,ro '{locked}' || exit 77"
    mount_read_only += '; exec "$@"'
    cli = [sys.executable, "-m", "kd_ext.cli", "infer", str(ir), str(images), "--out", str(locked / "out")]
    result = subprocess.run(["unshare", "-m", "sh", "-c", mount_read_only, "sh", *cli], capture_output=True, text=True)
    if result.returncode == 77:
        pytest.skip(f"cannot mount read-only here: {result.stderr.strip()}")
    assert result.returncode == 2, result.stderr
    assert "failed (read-only file system). Choose a writable --out." in result.stderr


def test_recursive_name_collision_exits_2_before_inference(
    ir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "tree"
    write_image(root / "scan.jpg", 20)  # output masks/scan.png ...
    write_image(root / "scan.png" / "0.png", 200)  # ... is also the folder of masks/scan.png/0.png
    no_inference(monkeypatch)
    out = tmp_path / "out"
    assert main(["infer", str(ir), str(root), "--out", str(out), "--recursive"]) == 2
    err = capsys.readouterr().err
    assert "'scan.png/0.png' needs an output folder 'scan.png', which is the output file of 'scan.jpg'" in err
    assert "Rename or move one image" in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_case_insensitive_output_collision_exits_2(
    ir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "tree"
    write_image(root / "A.png", 20)
    write_image(root / "a.png", 200)
    monkeypatch.setattr(edge_folder, "_case_insensitive", lambda folder: True)  # as on macOS / Windows / FAT
    no_inference(monkeypatch)
    assert main(["infer", str(ir), str(root), "--out", str(tmp_path / "out")]) == 2
    assert "'A.png' and 'a.png' both map to 'a.png' (the output file system ignores case)" in capsys.readouterr().err


def test_ir_read_error_shows_openvino_reason(ir: Path, tmp_path: Path) -> None:
    other = classifier_ir(tmp_path / "other" / "model.xml")
    ir.with_suffix(".bin").write_bytes(other.with_suffix(".bin").read_bytes()[:3])
    with pytest.raises(EdgeModelError, match="Incorrect weights in bin file") as caught:
        EdgeModel(ir)
    assert "Exception from src" not in str(caught.value)


# Issue 20, case A: without --overwrite, a run never replaces or deletes what someone else put into --out meanwhile;
# case B: a signal at any point of the final swap leaves a message that is true on disk, and a later run removes
# the staging folders of stopped processes; case E: scores.csv tells an undecodable file name from a valid name
# written the same way.


def wait_for(condition: object, process: subprocess.Popen | None = None, seconds: float = 60) -> None:
    """Poll ``condition()`` until it holds (the process, if given, must still run)."""
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if process is not None and process.poll() is not None:
            pytest.fail(f"the run ended early: {process.communicate()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# A: a run never replaces or deletes what someone else put into --out meanwhile (without --overwrite).

PAUSED_CLI = """
import os, sys, time
from pathlib import Path
from kd_ext.edge import folder
original = folder.load_image
def paused(*args, **kwargs):  # the first image waits until the test has changed --out
    if not os.path.exists(os.environ["KD_TEST_STARTED"]):
        Path(os.environ["KD_TEST_STARTED"]).touch()
        deadline = time.monotonic() + 60
        while not os.path.exists(os.environ["KD_TEST_GO"]) and time.monotonic() < deadline:
            time.sleep(0.02)
    return original(*args, **kwargs)
folder.load_image = paused
from kd_ext.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_paused(ir: Path, images: Path, out: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """Start `kd-ext infer` paused at its first image (staging folder made); returns it and its go-file."""
    started, go = tmp_path / "started", tmp_path / "go"
    env = {**os.environ, "KD_TEST_STARTED": str(started), "KD_TEST_GO": str(go)}
    command = [sys.executable, "-c", PAUSED_CLI, "infer", str(ir), str(images), "--out", str(out), "--quiet", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(started.exists, process)
    return process, go


def test_file_put_into_out_during_the_run_is_kept(ir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "scored"
    process, go = start_paused(ir, images, out, tmp_path)
    out.mkdir()
    (out / "notes.txt").write_text("important")
    go.touch()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2, err
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "important"
    kept = tmp_path / f"scored.run-{process.pid}"
    assert f"Output folder {out} was created by someone else" in err
    assert f"This run's complete results are in {kept}" in err
    results = json.loads((kept / "results.json").read_text())
    assert results["complete"] is True
    assert len(results["images"]) == 5
    assert not list(tmp_path.glob(".scored.partial-*"))


def test_overwrite_still_replaces_what_appeared_during_the_run(ir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "scored"
    process, go = start_paused(ir, images, out, tmp_path, "--overwrite")
    out.mkdir()
    (out / "notes.txt").write_text("replaced: the user asked for --overwrite")
    go.touch()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert not (out / "notes.txt").exists()
    assert json.loads((out / "results.json").read_text())["complete"] is True


def test_two_runs_into_the_same_out_never_both_claim_it(ir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "scored"
    first, go = start_paused(ir, images, out, tmp_path)  # 5 readable images
    other = tmp_path / "other_images"
    write_image(other / "only.png", 20)
    second = subprocess.run(
        [sys.executable, "-m", "kd_ext.cli", "infer", str(ir), str(other), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 0, second.stderr
    go.touch()
    _, err = first.communicate(timeout=60)
    assert first.returncode == 2, err  # out was absent at its start and now holds the second run's results
    assert [row["image"] for row in json.loads((out / "results.json").read_text())["images"]] == ["only.png"]
    kept = tmp_path / f"scored.run-{first.pid}"
    assert str(kept) in err
    assert len(json.loads((kept / "results.json").read_text())["images"]) == 5


def test_empty_out_filled_during_the_run_is_kept(
    ir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "scored"
    out.mkdir()  # empty at the start: allowed, and the same folder at the end (the rename itself refuses)
    original = edge_folder.load_image

    def fill_out(*args: object, **kwargs: object) -> object:
        (out / "notes.txt").write_text("important")
        return original(*args, **kwargs)

    monkeypatch.setattr(edge_folder, "load_image", fill_out)
    assert main(["infer", str(ir), str(images), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "was replaced or files were put into it by someone else" in err
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
    kept = tmp_path / f"scored.run-{os.getpid()}"
    assert str(kept) in err
    assert json.loads((kept / "results.json").read_text())["complete"] is True


# B: the message is true in every window of the swap; stale staging folders of stopped processes are removed.

SLOW_DELETE_CLI = """
import os, sys, time
from pathlib import Path
import shutil
real_rmtree = shutil.rmtree
def slow_rmtree(path, *args, **kwargs):
    # Deletes the previous results slowly, in the order least kind to a marker: files, the marker first.
    files = sorted((p for p in Path(path).rglob("*") if p.is_file()), key=lambda p: (p.name != "{marker}", str(p)))
    if any(p.name.startswith("previous-") for p in files):
        Path(os.environ["KD_TEST_DELETING"]).touch()
        for file in files:
            file.unlink()
            time.sleep(0.05)
    real_rmtree(path, *args, **kwargs)
shutil.rmtree = slow_rmtree
from kd_ext.cli import main
sys.exit(main(sys.argv[1:]))
""".replace("{marker}", edge_folder.STAGING_MARKER)


@pytest.mark.parametrize(("signal_number", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_deleting_previous_results(
    ir: Path, images: Path, tmp_path: Path, signal_number: int, exit_code: int
) -> None:
    out = previous_results(tmp_path / "scored", files=200)
    deleting = tmp_path / "deleting"
    command = [sys.executable, "-c", SLOW_DELETE_CLI, "infer", str(ir), str(images), "--out", str(out), "--overwrite"]
    env = {**os.environ, "KD_TEST_DELETING": str(deleting)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(deleting.exists, process)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=60)
    assert process.returncode == exit_code, err
    staging = tmp_path / f".scored.partial-{process.pid}"
    name = signal.Signals(signal_number).name
    assert (
        f"interrupted by {name}: the new results are complete in {out}; deleting the previous results was "
        f"interrupted and the rest of them is in {staging}" in err
    )
    assert "move them back" not in err
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    assert len(results["images"]) == 5
    assert (staging / edge_folder.STAGING_MARKER).is_file()  # the marker outlives the clean-up: the next run removes it
    assert main(["infer", str(ir), str(images), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert not list(tmp_path.glob(".scored.partial-*"))


def message_is_true(err: str, out: Path, tmp_path: Path, previous_files: int) -> None:
    """What an interrupted run's message says about ``out`` and its staging folder holds on disk."""
    staging = sorted(tmp_path.glob(".out.partial-*"))
    if "the new results are complete in" in err:
        assert json.loads((out / "results.json").read_text())["complete"] is True
        assert not list(out.glob("previous-*"))
        if staging:  # named in the message, with its marker unless nothing else is left in it
            assert str(staging[0]) in err
            assert (staging[0] / edge_folder.STAGING_MARKER).is_file() or not any(staging[0].iterdir())
        else:
            assert ".out.partial-" not in err
    elif "move them back" in err:
        assert not out.exists()
        assert len(list(staging[0].glob("old/previous-*"))) == previous_files
    elif "was not changed" in err or "nothing was written" in err:
        if previous_files:
            assert json.loads((out / "results.json").read_text()) == {"previous": True}
            assert len(list(out.glob("previous-*"))) == previous_files
        else:
            assert not out.exists() or not any(out.iterdir())
        assert bool(staging) == ("not all removed" in err)
    else:  # an interruption outside the writer's clean-up: the CLI names the possibilities
        assert f"check {out} (the previous results, the new complete results, or nothing)" in err


@pytest.mark.parametrize("interrupts", [1, 2])
@pytest.mark.parametrize("overwrite", [True, False])
def test_interruption_at_every_step_of_the_swap_leaves_a_true_message(
    ir: Path,
    images: Path,
    tmp_path: Path,
    overwrite: bool,
    interrupts: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Ctrl-C at the n-th rename/unlink/rmdir of --out or the staging folder, for every n of a run.

    With ``interrupts=2``, a second Ctrl-C lands on the next such step too (the first step of the clean-up).
    """
    out = tmp_path / "out"
    previous_files = 3 if overwrite else 0
    real = {"rename": os.rename, "unlink": os.unlink, "rmdir": os.rmdir}
    calls = {"count": 0, "interrupt_at": 0}

    def counted(name: str) -> object:
        def call(path: object, *args: object, **kwargs: object) -> object:
            ours = ".out.partial-" in os.fsdecode(path) or os.fsdecode(path) == str(out) or "dir_fd" in kwargs
            if calls["interrupt_at"] and ours:  # dir_fd: shutil.rmtree deleting inside a folder
                calls["count"] += 1
                if calls["interrupt_at"] <= calls["count"] < calls["interrupt_at"] + interrupts:
                    raise KeyboardInterrupt
            return real[name](path, *args, **kwargs)

        return call

    for name in real:
        monkeypatch.setattr(os, name, counted(name))
    command = ["infer", str(ir), str(images), "--out", str(out), "--quiet", *(["--overwrite"] * overwrite)]
    step = 0
    while True:
        step += 1
        calls.update(count=0, interrupt_at=0)
        if out.exists():
            shutil.rmtree(out)
        if previous_files:
            previous_results(out, files=previous_files)
        calls["interrupt_at"] = step
        code = main(command)
        err = capsys.readouterr().err
        if calls["count"] < step:  # the run made fewer steps: every window was tried
            assert code == 0, err
            break
        assert code == 130, err
        message_is_true(err, out, tmp_path, previous_files)
        calls["interrupt_at"] = 0
        again = [*command, *(["--overwrite"] * (not overwrite))]  # the new results may be complete in out
        assert main(again) == 0, capsys.readouterr().err  # the next run cleans up and succeeds in every window
        assert not list(tmp_path.glob(".out.partial-*"))
    assert step - 1 >= (10 if overwrite else 4)  # the windows tried: renames, each deletion, the marker, rmdir


def test_stale_staging_without_marker_or_new_results_is_removed(ir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    empty = tmp_path / f".out.partial-{stopped_pid()}"  # stopped after deleting its marker, before its rmdir
    empty.mkdir()
    only_new = tmp_path / f".out.partial-{stopped_pid()}"  # stopped while creating it
    (only_new / "new").mkdir(parents=True)
    deleting = staging_of(out, stopped_pid())  # stopped while deleting the previous results: no new/ any more
    previous_results(deleting / "old", files=3)
    (deleting / "new" / "masks" / "x.png").unlink()
    for folder in ("masks", ""):
        (deleting / "new" / folder).rmdir()
    score_folder(EdgeModel(ir), images, out, progress=None)  # out is missing: the partial old/ is not restored
    assert json.loads((out / "results.json").read_text())["complete"] is True
    assert not list(out.glob("previous-*"))
    assert not list(tmp_path.glob(".out.partial-*"))


def test_empty_staging_of_a_running_process_is_kept(ir: Path, images: Path, tmp_path: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as running:
        try:
            live = tmp_path / f".out.partial-{running.pid}"
            live.mkdir()
            score_folder(EdgeModel(ir), images, tmp_path / "out", progress=None)
            assert live.is_dir()
        finally:
            running.kill()


# E: scores.csv tells an undecodable name from a valid name written the same way.


def test_undecodable_name_and_its_escaped_lookalike_stay_apart(
    ir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = undecodable_names(tmp_path / "images", b"caf\xe9.png", b"bad\xfe.png")
    write_image(folder / "caf\\xe9.png", 20)  # valid UTF-8: a real backslash, then "xe9"
    write_image(folder / "plain name.png", 20)
    out = tmp_path / "out"
    assert main(["infer", str(ir), str(folder), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    with (out / "scores.csv").open(encoding="utf-8", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["image"] for row in rows].count("caf\\xe9.png") == 2  # the escaped text alone is ambiguous ...
    raw = {unquote_to_bytes(row["image_bytes"]): row for row in rows}  # ... the bytes are not
    assert set(raw) == {b"caf\xe9.png", b"caf\\xe9.png", b"plain name.png"}
    assert raw[b"caf\xe9.png"]["label_name"] == "anomalous"
    assert raw[b"caf\\xe9.png"]["label_name"] == "normal"
    for name, row in raw.items():
        assert (folder / os.fsdecode(name)).is_file()
        assert row["image_bytes"].isascii()
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert {row["image_bytes"]: row["score"] for row in results["images"]} == pytest.approx(
        {row["image_bytes"]: float(row["score"]) for row in rows}, abs=1e-6
    )
    assert results["skipped"][0]["image_bytes"] == "bad%FE.png"
    with (out / "skipped.csv").open(encoding="utf-8", newline="") as stream:
        assert next(csv.DictReader(stream))["image_bytes"] == "bad%FE.png"
