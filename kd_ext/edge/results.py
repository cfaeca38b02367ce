r"""Writing results atomically: output names, a staging folder renamed into place, per-image files and tables.

Outputs are written into a hidden staging folder ``.<out>.partial-<pid>`` next to ``out_dir`` (it holds a
marker file with the writing process's id and host, written first and deleted last) and renamed to ``out_dir``
only when everything was written, so a folder named ``out_dir`` is always complete (its ``results.json`` also
says ``"complete": true``).

Without ``overwrite``, ``out_dir`` must be absent or an empty folder at the start, and it is claimed only if it is
still what it was then: the new results are renamed onto it, which the file system refuses atomically when files
were put into it meanwhile. When ``out_dir`` was created, replaced or filled by someone else (another run into the
same folder, a user's file) nothing there is touched: the run's complete results are renamed to
``<out>.run-<pid>`` next to it and :class:`EdgeInputError` names that folder.

With ``overwrite``, the previous ``out_dir`` is first moved into the staging folder (``old/``), the new results
are renamed in, and only then is the previous folder deleted (the marker last): an interruption at any point
leaves either the previous or the new results in ``out_dir``, and the :class:`EdgeInterruptedError` message says
which (found on disk: whether ``out_dir`` is the folder the new results were written to), and where anything
else was left. A later run into the same ``out_dir`` removes staging folders whose process is gone, restoring
previous results that a killed run had moved aside but not yet replaced; staging folders of running processes,
and folders of that name without kd_ext's marker that hold anything, are kept. A symbolic link as ``out_dir``
stays a link: the results replace the folder it points to. :func:`write_results` is this writer, for images and
series alike.

Output names are checked before any inference: collisions (with ``recursive``, an output that would be both a
file and a folder, or names that differ only in case on a case-insensitive output file system). File names that
are not valid UTF-8 are written with backslash escapes (``bad\xff.png``) in the ``image`` column, and with ``_``
for the backslash in output file names; the ``image_bytes`` column gives every name's exact bytes,
percent-encoded (:func:`name_bytes`), so that such a name and a valid name written the same way
(``bad\xff.png`` with a real backslash) stay apart.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote_from_bytes

import numpy as np
from PIL import Image

from .errors import EdgeInputError, EdgeInterruptedError, text_name
from .heatmap import overlay
from .images import LoadedImage, Source
from .runtime import Prediction

STAGING_MARKER = "kd_ext-run.json"
"""File in a staging folder naming the process (``pid``) and host that write it (the first file written in the
folder, the last deleted)."""
Result = TypeVar("Result")
FolderId = tuple[int, int]
"""A folder's identity, ``(st_dev, st_ino)``: kept by a rename, so it tells whose results a folder holds."""
CLAIM_REFUSED = {errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR}
"""Errors of renaming the new results onto ``out_dir`` that mean something else is there now."""


def name_bytes(name: str) -> str:
    r"""A file name's exact bytes, percent-encoded (RFC 3986; ``/`` kept), for the ``image_bytes`` column.

    Unlike :func:`text_name`, this is one-to-one: ``b"caf\xe9.png"`` gives ``caf%E9.png`` and a valid name
    written ``caf\xe9.png`` (a real backslash) gives ``caf%5Cxe9.png``. ``urllib.parse.unquote_to_bytes``
    returns the bytes (``os.fsdecode`` of them opens the file).

    Args:
        name: A path as Python returned it from the file system (undecodable bytes as surrogate escapes).

    Returns:
        str: ASCII text.
    """
    return quote_from_bytes(os.fsencode(name), safe="/")


def _output_name(name: str, used: set[str]) -> str:
    """Output ``.png`` path for an image's text name.

    The suffix becomes ``.png`` (``x.jpg`` -> ``x.png``, or ``x_jpg.png`` when ``x.png`` is taken); backslashes
    (escapes of undecodable bytes) become ``_``.
    """
    safe = name.replace("\\", "_")
    stem = str(Path(safe).with_suffix("").as_posix())
    candidate = f"{stem}.png"
    if candidate in used:
        candidate = f"{stem}{Path(safe).suffix.replace('.', '_')}.png"
    used.add(candidate)
    return candidate


def plan_sources(files: list[Path], root: Path) -> list[Source]:
    """Text and output names of the files to score.

    Args:
        files: Image files under ``root``.
        root: The scored folder.

    Returns:
        list[Source]: One per file, in order.
    """
    used: set[str] = set()
    sources = []
    for path in files:
        relative = path.relative_to(root).as_posix()
        name = text_name(relative)
        sources.append(Source(path=path, name=name, out_name=_output_name(name, used), name_bytes=name_bytes(relative)))
    return sources


def check_output_names(sources: list[Source], case_insensitive: bool = False) -> None:
    """Refuse output names that would overwrite each other, before any inference.

    Two images collide when their output names are equal (compared case-insensitively on a case-insensitive
    output file system), or when one image's output file is a folder another image's output needs
    (``x.png`` and ``x.png/y.png`` with ``recursive``).

    Args:
        sources: The planned names (:func:`plan_sources`).
        case_insensitive: Whether the output file system ignores case.

    Raises:
        EdgeInputError: Naming the colliding images and how to resolve it.
    """
    key = str.casefold if case_insensitive else str
    files: dict[str, Source] = {}
    collisions: list[str] = []
    for source in sources:
        other = files.setdefault(key(source.out_name), source)
        if other is not source:
            why = " (the output file system ignores case)" if case_insensitive else ""
            collisions.append(f"'{other.name}' and '{source.name}' both map to '{source.out_name}'{why}")
    for source in sources:
        parts = source.out_name.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            other = files.get(key(folder))
            if other is not None:
                collisions.append(
                    f"'{source.name}' needs an output folder '{folder}', which is the output file of '{other.name}'"
                )
    if collisions:
        shown = "; ".join(collisions[:3]) + (f"; and {len(collisions) - 3} more" if len(collisions) > 3 else "")
        msg = (
            f"Output names of masks/ and overlays/ collide: {shown}. Rename or move one image of each pair, score "
            "the sub-folders separately, or pass --no-masks --no-overlays."
        )
        raise EdgeInputError(msg)


def _case_insensitive(folder: Path) -> bool:
    """Whether the file system of ``folder`` (which must be writable) ignores the case of names."""
    probe = folder / "kd_ext-Case-Probe"
    probe.touch()
    try:
        return (folder / "kd_ext-case-probe").exists()
    finally:
        probe.unlink()


def _pid_alive(pid: int) -> bool:
    """Whether a process runs (``True`` where that cannot be told safely: a folder is then kept)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def _folder_id(path: Path) -> FolderId | None:
    """``(st_dev, st_ino)`` of ``path`` itself (a link is not followed); ``None`` when it does not exist."""
    try:
        stat = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _holds_nothing(staging: Path) -> bool:
    """Whether a staging folder holds nothing: at most an empty ``new/`` and an empty marker.

    Such a folder is what a run leaves when stopped while creating it or after deleting its marker.
    """
    for entry in staging.iterdir():
        if entry.is_symlink():
            return False
        if entry.name == "new" and entry.is_dir() and not any(entry.iterdir()):
            continue
        if entry.name == STAGING_MARKER and entry.is_file() and entry.stat().st_size == 0:
            continue
        return False
    return True


def _owned_by(staging: Path, pid: int) -> bool:
    """Whether ``staging`` is a staging folder of process ``pid`` on this host (its marker says so) or empty."""
    try:
        owner = json.loads((staging / STAGING_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        try:
            return _holds_nothing(staging)
        except OSError:
            return False
    return isinstance(owner, dict) and owner.get("pid") == pid and owner.get("host") == socket.gethostname()


def _stale_pid(entry: Path, prefix: str) -> int | None:
    """The process id of a staging folder of ours whose process is gone (``None``: not ours, or still running)."""
    pid_text = entry.name[len(prefix) :]
    if not entry.name.startswith(prefix) or not pid_text.isdigit() or not entry.is_dir() or entry.is_symlink():
        return None
    pid = int(pid_text)
    if pid != os.getpid() and _pid_alive(pid):
        return None
    return pid if _owned_by(entry, pid) else None


def _remove_staging(staging: Path) -> None:
    """Delete a staging folder, its marker last: a folder with anything else in it keeps its marker.

    Raises:
        OSError: If something could not be deleted (the marker is then kept).
    """
    for entry in sorted(staging.iterdir()):
        if entry.name == STAGING_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (staging / STAGING_MARKER).unlink(missing_ok=True)
    staging.rmdir()


def remove_stale_staging(out_dir: str | Path, log: IO[str] | None = None) -> list[Path]:
    """Remove staging folders of earlier runs into ``out_dir`` whose process is no longer running.

    Only folders named ``.<out>.partial-<pid>`` that hold kd_ext's marker written on this host, or nothing at all,
    are touched. When a killed run had moved the previous ``out_dir`` into its staging folder (``old/``) but not
    yet renamed its new results in (``new/`` is still there) and ``out_dir`` is missing, the previous results are
    moved back first; if ``out_dir`` exists by then, that folder is kept and reported. Without ``new/``, ``old/``
    is the rest of previous results whose deletion was interrupted after the new results replaced them: deleted.
    A folder that cannot be removed is reported and kept.

    Args:
        out_dir: The output folder (a symbolic link is followed to the folder it points to).
        log: Stream for a line per removed, restored or kept folder.

    Returns:
        list[Path]: The staging folders removed.
    """
    target = _output_target(Path(out_dir))
    prefix = _staging_prefix(target)
    try:
        entries = sorted(target.parent.iterdir()) if target.parent.is_dir() else []
    except OSError:
        return []
    removed = []
    for entry in entries:
        pid = _stale_pid(entry, prefix)
        if pid is None:
            continue
        try:
            if (entry / "old").exists() and (entry / "new").exists():  # stopped before renaming its results in
                if target.exists() or target.is_symlink():
                    if log is not None:
                        log.write(
                            f"kept {text_name(entry)}: its old/ holds the previous results of {text_name(target)}, "
                            "which was re-created since; move them back or delete it\n"
                        )
                    continue
                os.rename(entry / "old", target)
                if log is not None:
                    log.write(f"restored {text_name(target)} from {text_name(entry)}, left by stopped process {pid}\n")
            _remove_staging(entry)
        except OSError as error:
            if log is not None:
                log.write(f"could not remove {text_name(entry)} of stopped process {pid} ({error}); delete it\n")
            continue
        removed.append(entry)
        if log is not None:
            log.write(f"removed {text_name(entry)}, partial output of stopped process {pid}\n")
    return removed


def _output_target(out_dir: Path) -> Path:
    """The path results are renamed to: ``out_dir``, or the folder a symbolic link ``out_dir`` points to."""
    if not out_dir.is_symlink():
        return out_dir
    target = Path(os.path.realpath(out_dir))
    if target.is_symlink():
        msg = f"--out {text_name(out_dir)} is a symbolic link that cannot be resolved (a loop?); remove the link."
        raise EdgeInputError(msg)
    return target


def _check_out(out_dir: Path, target: Path, source: Path, overwrite: bool, source_name: str) -> None:
    """Refuse an output location that cannot work, before anything is written."""
    shown = text_name(out_dir)
    scored = source.resolve()
    real = target.resolve()
    if real == scored or real in scored.parents:
        msg = f"--out {shown} is, or contains, the {source_name} {text_name(source)}; choose a folder outside it."
        raise EdgeInputError(msg)
    for ancestor in target.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                msg = (
                    f"--out {shown} cannot be created: {text_name(ancestor)} is a file, not a folder. Choose an "
                    "--out outside it."
                )
                raise EdgeInputError(msg)
            break
    if not target.exists():
        return
    if not target.is_dir():
        msg = f"--out {shown} exists and is a file, not a folder; remove it or choose another --out."
        raise EdgeInputError(msg)
    if not overwrite and any(target.iterdir()):
        msg = f"Output folder {shown} already exists; choose another or pass --overwrite."
        raise EdgeInputError(msg)
    if os.path.ismount(target):
        msg = f"--out {shown} is a mount point, which cannot be replaced by renaming; choose a folder inside it."
        raise EdgeInputError(msg)
    if not os.access(target, os.W_OK | os.X_OK):
        msg = (
            f"Cannot replace {shown}: no permission to write in it (needed to move and delete the previous "
            "results). Fix its permissions or choose another --out."
        )
        raise EdgeInputError(msg)


def _staging_path(target: Path) -> Path:
    return target.parent / f"{_staging_prefix(target)}{os.getpid()}"


def _make_staging(out_dir: Path, target: Path) -> Path:
    """Create the staging folder ``.<out>.partial-<pid>`` next to ``target``: its marker first, then ``new/``.

    A folder of that name left by an earlier call in this process was removed by :func:`remove_stale_staging`;
    one that is still there is not this run's, and is refused.

    Returns:
        Path: The folder the results are written to (``new/``).
    """
    staging = _staging_path(target)
    created = False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        created = True
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        (staging / STAGING_MARKER).write_text(json.dumps(owner) + "\n", encoding="utf-8")
        (staging / "new").mkdir()
    except OSError as error:
        if created:
            with contextlib.suppress(OSError):
                _remove_staging(staging)
        reason = "read-only file system" if error.errno == errno.EROFS else (error.strerror or str(error))
        msg = (
            f"Cannot write the output folder {text_name(out_dir)}: creating {text_name(staging)} failed "
            f"({reason}). Choose a writable --out."
        )
        raise EdgeInputError(msg) from error
    return staging / "new"


def _kept_path(target: Path) -> Path:
    """Where a run's results go when ``out_dir`` changed meanwhile (without ``overwrite``): ``<out>.run-<pid>``."""
    return target.parent / f"{target.name}.run-{os.getpid()}"


def _abandon(staging: Path, target: Path, shown: str, existed: bool, new_id: FolderId | None) -> str:
    """Undo an unfinished run after an error or interruption, from what is on disk now.

    Args:
        staging: The run's staging folder.
        target: Where the results were to be renamed to.
        shown: ``out_dir`` as the user gave it.
        existed: Whether ``target`` existed at the start.
        new_id: :func:`_folder_id` of the run's ``new/`` (``None`` if it was not created): ``target`` with this
            identity holds the new results.

    Returns:
        str: What is left on disk, in words that are true in every outcome.
    """
    if new_id is not None and _folder_id(target) == new_id:  # the new results were renamed in
        return _finish_swapped(staging, shown)
    kept = _kept_path(target)
    if new_id is not None and _folder_id(kept) == new_id:  # refused: out_dir changed meanwhile
        with contextlib.suppress(KeyboardInterrupt, OSError):
            _remove_staging(staging)
        return f"{shown} was not changed; the complete new results are in {text_name(kept)}"
    unchanged = f"{shown} was not changed" if existed else f"nothing was written ({shown} was not created)"
    if not staging.exists() or not _owned_by(staging, os.getpid()):
        return unchanged
    previous = staging / "old"
    try:
        if previous.exists() and (staging / "new").exists() and not (target.exists() or target.is_symlink()):
            os.rename(previous, target)
        _remove_staging(staging)
    except (KeyboardInterrupt, OSError):
        return _left_unswapped(staging, target, shown, unchanged)
    return f"{unchanged} and the partial new results were removed" if existed else unchanged


def _finish_swapped(staging: Path, shown: str) -> str:
    """What :func:`_abandon` says (and removes) once the new results are in ``out_dir``."""
    if staging.exists() and not (staging / "old").exists():
        with contextlib.suppress(KeyboardInterrupt, OSError):
            _remove_staging(staging)
    if not staging.exists():
        return f"the new results are complete in {shown}"
    deleting = (staging / "old").exists()
    what = "deleting the previous results was interrupted and the rest of them is in" if deleting else "left"
    return (
        f"the new results are complete in {shown}; {what} {text_name(staging)} (delete it; the next run into "
        f"{shown} also removes it)"
    )


def _left_unswapped(staging: Path, target: Path, shown: str, unchanged: str) -> str:
    """What is left when :func:`_abandon` could not restore the previous results or remove the new ones."""
    previous = staging / "old"
    if previous.exists() and not (target.exists() or target.is_symlink()):
        return (
            f"the previous results are in {text_name(previous)}: move them back to {shown} (the next run into "
            f"{shown} also does)"
        )
    if previous.exists():
        return (
            f"the previous results are in {text_name(previous)}, and {shown} was created by someone else "
            "meanwhile: compare them and move the previous results back yourself"
        )
    return (
        f"{unchanged}, but the partial new results in {text_name(staging)} were not all removed (delete it; the "
        f"next run into {shown} also removes it)"
    )


def _swap_in(staging: Path, target: Path, log: IO[str] | None) -> None:
    """Move the previous results into the staging folder, rename the new ones to ``target``, delete the previous."""
    if target.exists() or target.is_symlink():
        os.rename(target, staging / "old")
    os.rename(staging / "new", target)
    try:
        _remove_staging(staging)
    except OSError as error:
        if log is not None:
            log.write(
                f"the new results are complete in {text_name(target)}, but {text_name(staging)} (the previous "
                f"results) could not be deleted: {error}; delete it\n"
            )


def _claim(staging: Path, target: Path, start: FolderId | None, shown: str) -> None:
    """Rename the new results to ``target`` if it is still what it was at the start (absent or an empty folder).

    The rename itself refuses, atomically, a folder that is no longer empty; a folder that was created or replaced
    meanwhile is refused before it. Then nothing at ``target`` is touched: the new results are renamed to
    :func:`_kept_path` (or stay in the staging folder, which loses its marker so that no clean-up deletes it).

    Raises:
        EdgeInputError: If ``target`` changed, naming the folder with this run's complete results.
    """
    now = _folder_id(target)
    changed = now is not None and now != start
    if not changed:
        try:
            os.rename(staging / "new", target)
        except OSError as error:
            if error.errno not in CLAIM_REFUSED:
                raise
            changed = True
    if not changed:
        with contextlib.suppress(OSError):
            _remove_staging(staging)
        return
    what = "was created" if start is None else "was replaced or files were put into it"
    kept = _kept_path(target)
    try:
        os.rename(staging / "new", kept)
    except OSError:
        (staging / STAGING_MARKER).unlink()
        kept = staging / "new"
    else:
        with contextlib.suppress(OSError):
            _remove_staging(staging)
    msg = (
        f"Output folder {shown} {what} by someone else (another run into it, or a user) while this run was "
        f"writing; nothing in it was replaced or deleted. This run's complete results are in {text_name(kept)}: "
        f"compare and move them yourself, or run again with --overwrite to replace {shown}."
    )
    raise EdgeInputError(msg)


def write_image_outputs(
    images: list[LoadedImage],
    prediction: Prediction,
    work: Path,
    masks: bool,
    overlays: bool,
) -> list[dict[str, Any]]:
    """Write each image's mask and overlay into ``work`` and return its table rows.

    Args:
        images: The batch's images.
        prediction: Their predictions, in order.
        work: The staging folder.
        masks: Write binary masks (``masks/<name>.png``, 0/255, at the image's size).
        overlays: Write heat-map overlays (``overlays/<name>.png``).

    Returns:
        list[dict]: One row per image (``image``, ``score``, ``label``, ``label_name``, ``notes``, output files).
    """
    rows = []
    for index, image in enumerate(images):
        out_name = image.source.out_name
        row: dict[str, Any] = {
            "image": image.source.name,
            "image_bytes": image.source.name_bytes,
            "score": float(prediction.pred_score[index]),
            "label": int(prediction.pred_label[index]),
            "label_name": "anomalous" if prediction.pred_label[index] else "normal",
            "notes": "; ".join(image.notes),
        }
        if masks:
            mask = Image.fromarray(prediction.pred_mask[index].astype(np.uint8) * 255)
            mask = mask.resize(image.original.size, Image.Resampling.NEAREST)
            path = work / "masks" / out_name
            path.parent.mkdir(parents=True, exist_ok=True)
            mask.save(path)
            row["mask"] = f"masks/{out_name}"
        if overlays:
            path = work / "overlays" / out_name
            path.parent.mkdir(parents=True, exist_ok=True)
            overlay(image.original, prediction.anomaly_map[index]).save(path)
            row["overlay"] = f"overlays/{out_name}"
        rows.append(row)
    return rows


def write_tables(work: Path, rows: list[dict[str, Any]], skipped: list[dict[str, str]], info: dict) -> None:
    """Write ``scores.csv``, ``skipped.csv`` (when files were skipped) and ``results.json`` into ``work``.

    Args:
        work: The staging folder.
        rows: Rows of :func:`write_image_outputs`.
        skipped: ``{"image", "reason", "image_bytes"}`` of the files that could not be read.
        info: Run information for ``results.json`` (model, source, seconds).
    """
    columns = ["image", "score", "label", "label_name", "notes", "mask", "overlay", "image_bytes"]
    with (work / "scores.csv").open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "score": f"{row['score']:.6f}"})
    if skipped:
        with (work / "skipped.csv").open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=["image", "reason", "image_bytes"])
            writer.writeheader()
            writer.writerows(skipped)
    payload = {**info, "images": rows, "skipped": skipped, "complete": True}
    (work / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _prepare_out(out_dir: Path, source: Path, overwrite: bool, log: IO[str] | None, source_name: str) -> Path:
    """Remove stale staging folders and check the output location.

    Returns:
        Path: Where the results will be renamed to (:func:`_output_target`).
    """
    target = _output_target(out_dir)
    remove_stale_staging(out_dir, log)
    try:
        _check_out(out_dir, target, source, overwrite, source_name)
    except OSError as error:
        msg = f"Cannot use --out {text_name(out_dir)} ({error}); choose another --out."
        raise EdgeInputError(msg) from error
    return target


def write_results(
    out_dir: Path,
    source: Path,
    write: Callable[[Path], Result],
    overwrite: bool = False,
    log: IO[str] | None = None,
    source_name: str = "image folder",
) -> Result:
    """Run ``write`` into a staging folder and make its output ``out_dir`` only when it returns (module docstring).

    Stale staging folders are removed and the output location is checked first; then ``write(folder)`` fills a new
    staging folder, which replaces ``out_dir`` (the previous results are deleted only after that). Without
    ``overwrite``, ``out_dir`` is claimed only if it is still what it was at the start (module docstring). If
    ``write`` raises, nothing it wrote is left and ``out_dir`` is as before.

    Args:
        out_dir: Output folder (a symbolic link is kept; the folder it points to receives the results).
        source: What is scored (a folder or a file); ``out_dir`` must not be it or contain it.
        write: Writes every output into the folder it is given and returns what the caller needs.
        overwrite: Replace an existing non-empty ``out_dir``.
        log: Stream for stale-folder clean-up notices.
        source_name: What ``source`` is, for messages ("image folder", "series file").

    Returns:
        What ``write`` returned.

    Raises:
        EdgeInputError: If ``out_dir`` exists (without ``overwrite``) or cannot be written, or (without
            ``overwrite``) was changed by someone else while ``write`` ran: the message names the folder with
            the complete results.
        EdgeInterruptedError: On ``KeyboardInterrupt`` (Ctrl-C) or :class:`TerminationSignal` (SIGTERM, see
            :func:`terminate_as_interrupt`), after cleaning up; its message says what was left where.
    """
    shown = text_name(out_dir)
    target = _prepare_out(out_dir, source, overwrite, log, source_name)
    start = _folder_id(target)
    staging = _staging_path(target)
    new_id: FolderId | None = None
    try:
        work = _make_staging(out_dir, target)
        new_id = _folder_id(work)
        result = write(work)
        if overwrite:
            _swap_in(staging, target, log)
        else:
            _claim(staging, target, start, shown)
    except BaseException as error:
        left = _abandon(staging, target, shown, start is not None, new_id)
        if isinstance(error, KeyboardInterrupt):
            number = getattr(error, "signal_number", signal.SIGINT)
            msg = f"interrupted by {signal.Signals(number).name}: {left}."
            raise EdgeInterruptedError(msg, number) from error
        raise
    return result


__all__ = [
    "STAGING_MARKER",
    "check_output_names",
    "name_bytes",
    "plan_sources",
    "remove_stale_staging",
    "write_image_outputs",
    "write_results",
    "write_tables",
]
