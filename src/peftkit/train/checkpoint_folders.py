"""The checkpoint folders of an output_dir: which are complete, which to resume, which to prune,
and what a killed save left behind.

A checkpoint is built in `checkpoint-{step}.tmp-{pid}` and renamed to `checkpoint-{step}`; its
state file is written last, so a folder with that file is complete. Pruning renames a folder to
`checkpoint-{step}.deleting-{pid}` before deleting it. Re-saving a step that exists swaps the two
folders atomically where the system can (Linux renameat2); elsewhere it moves the old folder to
`checkpoint-{step}.old-{pid}` before renaming the new one in: a kill between the two renames
leaves both copies, and `remove_stale_temporaries` puts the newer complete one back in place
instead of deleting them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from .checkpoint_check import STATE_FILE, CheckpointError, check_checkpoint

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^checkpoint-(\d+)\.(tmp|old|deleting)-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first.

    A damaged one (its state file unreadable) is left out with a warning naming the file: the
    older checkpoints can still be resumed, pruned or refused by a fresh run, so stopping
    for it would help nobody, but resuming from an older step must not happen unannounced.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if not (match and child.is_dir()):
            continue
        try:
            state = read_state(child)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; leaving {child.name} out of the checkpoints of {root}", stacklevel=2)
            continue
        if state is not None:
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def latest_usable_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint whose every file and field checks out (see checkpoint_check).

    Newer ones that do not (a truncated or NaN tensor file, a folder holding only its state
    file, a tampered counter) are skipped with a warning that says why; they stay on disk,
    out of pruning's reach, until the run re-saves their step over them."""
    skipped = []
    for step, path in reversed(list_checkpoints(output_dir)):
        try:
            check_checkpoint(path, read_state(path))
        except CheckpointError as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        if skipped:
            warnings.warn(f"resuming from {path}, the newest usable checkpoint; newer ones cannot be used:\n  "
                          + "\n  ".join(skipped), stacklevel=3)
        return path
    if skipped:
        raise CheckpointError(f"no usable checkpoint in {output_dir}:\n  " + "\n  ".join(skipped))
    return None


def resolve_resume_path(resume_from: str, output_dir: str | os.PathLike) -> Path | None:
    """Checkpoint folder for `resume_from` ("latest" may find none: None, a fresh start). A named
    folder must be complete and check out; "latest" falls back to the newest one that does."""
    if resume_from == "latest":
        return latest_usable_checkpoint(output_dir)
    path = Path(resume_from)
    try:
        state, problem = read_state(path), None
    except CheckpointError as exc:
        state, problem = None, str(exc)
    if state is None:
        latest = find_latest_checkpoint(output_dir)
        hint = f"; the latest complete checkpoint in {output_dir} is {latest}" if latest else ""
        found = problem or f"expected a folder containing {STATE_FILE}"
        raise CheckpointError(
            f"resume_from={resume_from!r} is not a complete peftkit training checkpoint ({found}){hint}"
        )
    check_checkpoint(path, state)
    return path


def read_state(path: Path) -> dict[str, Any] | None:
    """The saved trainer state; None when there is no state file (not a checkpoint: the file is
    written last, so a folder without it is incomplete). A state file that is there but cannot
    be read or parsed raises CheckpointError naming it: the checkpoint is damaged, not absent."""
    file = path / STATE_FILE
    try:
        text = file.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} cannot be read ({exc})") from None
    try:
        state = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{file} is damaged: not valid JSON ({exc})") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise CheckpointError(f"{file} is damaged: no global_step in it")
    return state


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Clear what killed saves left: delete half-written folders of processes that no longer
    run, but first put back a checkpoint whose re-save was cut between its two renames (the
    new complete copy if there is one, else the old one). Returns the deleted paths."""
    root = Path(output_dir)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    by_step: dict[int, list[Path]] = {}
    for child in root.iterdir():
        match = _TMP_RE.match(child.name)
        if match and child.is_dir() and not _pid_alive(int(match.group(3))):
            by_step.setdefault(int(match.group(1)), []).append(child)
    for step, leftovers in sorted(by_step.items()):
        final = root / f"checkpoint-{step}"
        if not final.exists():
            complete = [p for p in leftovers if ".deleting-" not in p.name and (p / STATE_FILE).is_file()]
            # The new copy (.tmp) is complete only if its state file was written; prefer it.
            complete.sort(key=lambda p: ".tmp-" not in p.name)
            if complete:
                os.replace(complete[0], final)
                leftovers.remove(complete[0])
                warnings.warn(f"restored {final.name} from {complete[0].name}, left by a save that was "
                              "interrupted while it replaced that step", stacklevel=2)
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int, up_to_step: int | None = None) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints at or below `up_to_step` (the
    step just saved); newer ones, left by a run this one fell back from, are not counted (they
    would push out the checkpoints of this run) nor deleted. Returns the deleted paths."""
    found = [(step, path) for step, path in list_checkpoints(output_dir) if up_to_step is None or step <= up_to_step]
    doomed = [path for _, path in found[: max(0, len(found) - keep_last)]]
    for path in doomed:
        # Renamed first: a kill in the middle of deleting must not leave a `checkpoint-N` that
        # still has its state file but lacks others; the renamed rest is cleared on the next start.
        going = path.with_name(f"{path.name}.deleting-{os.getpid()}")
        os.replace(path, going)
        shutil.rmtree(going, ignore_errors=True)
    return doomed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
