"""Archiving an earlier report: it is never overwritten and nothing of it is deleted (`eval`'s reports, see
`evaluate`)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from dopr_robot.errors import UserError
from dopr_robot.evaluation.journal import JOURNAL_SUFFIX, journal_path
from dopr_robot.evaluation.video import videos_dir_for
from dopr_robot.rundir import ROLLOUTS_SUFFIX, rollouts_path


# An earlier report is never overwritten and nothing of it is deleted: it is renamed aside as one *set* with one
# suffix, `-<YYYYmmdd-HHMMSS>` (the report's modification time, UTC; `-N` appended when that is taken by any
# member of the set):
#     eval.json -> eval-S.json,   eval_episodes.jsonl -> eval-S_episodes.jsonl,   videos/ -> videos-S/,
#     eval_rollouts.hdf5 -> eval-S_rollouts.hdf5 (--save-trajectories)
#     (eval_T.json, eval_T_episodes.jsonl, videos_T/ alike: eval_T-S.json, eval_T-S_episodes.jsonl, videos_T-S/)
# A fresh evaluation archives the set when it starts (after every check, before the first episode), because its
# journal and videos are written as episodes run; until then the old files stay where they are. A `--resume` that
# continues a journal archives nothing then: it continues the same journal and videos directory, and at its end
# the report it replaces is archived alone (its videos are in the directory the resume continued).
# The report's `videos[].path` are relative to the report's directory, so an archived report would point into
# the new evaluation's videos directory; they are rewritten to the archived directory, and its `trajectories`
# to the archived rollouts file. The rewritten report is computed (and so validated) before anything moves,
# written atomically under its archived name with the original's modification time and mode, and only then is
# the original removed. A report that is not JSON, or names neither moved member, is renamed as it is.
def archive_report(report: Path, *, with_journal_and_videos: bool = True) -> Path | None:
    """Rename an earlier report (with its journal and videos directory, unless told not to) aside under one
    free `-<stamp>` suffix; returns the archived report's path (None if there was no report)."""
    from dopr_robot.fileio import atomic_path

    journal, videos, rollouts = journal_path(report), videos_dir_for(report), rollouts_path(report)
    moving = [report, journal, videos, rollouts] if with_journal_and_videos else [report]
    present = [p for p in moving if p.exists()]
    if not present:
        return None
    stamp = _stamp(present[0])  # the report's time when there is one (else the journal's, else the videos')
    for n in range(1000):
        suffix = f"-{stamp}{'-' + str(n) if n else ''}"
        target = {report: _suffixed(report, suffix, ".json"),
                  journal: _suffixed(journal, suffix, JOURNAL_SUFFIX), videos: _suffixed(videos, suffix, ""),
                  rollouts: _suffixed(rollouts, suffix, ROLLOUTS_SUFFIX)}
        if not any(os.path.lexists(t) for t in target.values()):  # every member free: the names pair up
            break
    else:
        raise UserError(f"cannot archive {report}: too many archived copies")
    moved_videos = (videos, target[videos]) if videos in present else None
    moved_rollouts = (rollouts, target[rollouts]) if rollouts in present else None
    rewritten = _retarget(report, moved_videos, moved_rollouts) \
        if report in present and (moved_videos or moved_rollouts) else None
    if rewritten is not None:
        st = report.stat()
        with atomic_path(target[report]) as tmp:
            tmp.write_text(rewritten)
            os.chmod(tmp, st.st_mode & 0o7777)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    for path in present:
        if path != report or rewritten is None:
            os.rename(path, target[path])
    if rewritten is not None:
        report.unlink()  # its rewritten copy is in place
    return target[report] if report in present else None


def _suffixed(path: Path, suffix: str, tail: str) -> Path:
    """eval.json + -S -> eval-S.json (the suffix goes before `tail`, the part of the name that says what it is)."""
    return path.with_name(path.name[: len(path.name) - len(tail)] + suffix + tail)


def _retarget(report: Path, videos: tuple[Path, Path] | None, rollouts: tuple[Path, Path] | None) -> str | None:
    """The report's text with its `videos[].path` inside the moved videos directory pointing into the archived one
    (still relative to the report's directory) and its `trajectories` at the moved rollouts file (each move given
    as (old, new)); None when there is nothing to rewrite."""
    try:
        data = json.loads(report.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    changed = False
    trajectories = data.get("trajectories")
    if rollouts is not None and isinstance(trajectories, str) and Path(trajectories).name == rollouts[0].name:
        # written as `out` was given (relative or absolute): only the file name changes
        data["trajectories"] = str(Path(trajectories).with_name(rollouts[1].name))
        changed = True
    entries = data.get("videos")
    if videos is None or not isinstance(entries, list):
        return json.dumps(data, indent=2) + "\n" if changed else None
    base, old, archived = Path(os.path.abspath(report.parent)), Path(os.path.abspath(videos[0])), videos[1]
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        try:
            inside = Path(os.path.abspath(base / entry["path"])).relative_to(old)
        except ValueError:  # a video elsewhere (an explicit videos_dir) does not move
            continue
        entry["path"] = os.path.relpath(Path(os.path.abspath(archived)) / inside, base)
        changed = True
    return json.dumps(data, indent=2) + "\n" if changed else None


def _stamp(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y%m%d-%H%M%S")
