"""The per-episode journal of one report, `<report stem>_episodes.jsonl`: what `eval --resume` continues from.

Line 1 is a header naming the checkpoint (path, step, sha256 of its weights) and every setting that changes an
episode's outcome; each later line is one finished episode's record, appended and fsync'd as it ends, so a
`kill -9` loses at most the episodes that were running. A resume must match the header exactly, else it is
refused (one line): mixing episodes of two checkpoints or two settings into one report is the silent error
this file exists to prevent. A torn last line (killed mid-append) is dropped when the journal is reopened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dopr_robot.errors import UserError

JOURNAL_VERSION = 1


JOURNAL_SUFFIX = "_episodes.jsonl"


def journal_path(report: Path) -> Path:
    return report.with_name(report.stem + JOURNAL_SUFFIX)


def report_of_journal(journal: Path) -> Path:
    """The report a journal belongs to (the inverse of `journal_path`)."""
    return journal.with_name(journal.name[: -len(JOURNAL_SUFFIX)] + ".json")


def read_journal(path: Path) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """(header, {seed: record}); (None, {}) when there is no journal. Later records of a seed win."""
    if not path.is_file():
        return None, {}
    lines = path.read_text().splitlines()
    header, records = None, {}
    for i, line in enumerate(lines):
        try:
            item = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break  # torn final append
            raise UserError(f"episode journal {path} is corrupt at line {i + 1}; move it away to start over")
        if i == 0:
            header = item
        else:
            records[int(item["seed"])] = item
    if not isinstance(header, dict) or header.get("journal") != JOURNAL_VERSION:
        raise UserError(f"{path} is not an episode journal of this tool; move it away to start over")
    return header, records


class Journal:
    """Append-only, fsync'd per record. Opening rewrites the file atomically with its valid lines only."""

    def __init__(self, path: Path, header: dict[str, Any], records: dict[int, dict[str, Any]]):
        from dopr_robot.fileio import write_text

        self.path = path
        text = "".join(json.dumps(item) + "\n" for item in [{"journal": JOURNAL_VERSION, **header},
                                                             *records.values()])
        write_text(path, text)
        self._file = open(path, "a")

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Settings a journal written before they existed ran with.
_LEGACY = {"batch_episodes": 1, "device": None}


def check_resumable(path: Path, header: dict[str, Any], expected: dict[str, Any]) -> None:
    """One line naming the first setting that differs between the journal and this evaluation."""
    for key, value in expected.items():
        written = header.get(key, _LEGACY.get(key))
        if written != value:
            raise UserError(f"--resume: {path} was written with {key}={written!r}, this evaluation has "
                            f"{key}={value!r}; rerun without --resume (the journal is kept as an archive)")
