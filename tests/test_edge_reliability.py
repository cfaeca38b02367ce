"""`kd-ext infer` reliability (issue 11): no results lost on interruption, bad images or bad output locations.

Uses the small synthetic IRs and images of ``test_edge.py`` (no torch, no training). Each test names the
issue's case it covers.
"""

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


def test_undecodable_file_names_are_written_escaped(ir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    try:
        bad = Path(os.fsdecode(os.path.join(os.fsencode(folder), b"bad\xff.png")))
        write_image(bad, 200)
        Path(os.fsdecode(os.path.join(os.fsencode(folder), b"worse\xfe.png"))).write_bytes(b"not an image")
    except (OSError, UnicodeError) as error:
        pytest.skip(f"this file system does not take non-UTF-8 names: {error}")
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
    assert "divided by 257" in notes["b_16bit.png"]


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
    foreign = tmp_path / ".out.partial-12"  # same name pattern, no kd_ext marker: not ours, kept
    foreign.mkdir()
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
