"""Where training metrics go: RUN/metrics.jsonl always, mirrored to TensorBoard or Weights & Biases on request.

`train.logger` picks the mirror: `none` (default; needs no extra package), `tensorboard` (event files in
RUN/tensorboard/, `pip install "dopr-robot[tensorboard]"`; view with `tensorboard --logdir RUN/tensorboard`) or
`wandb` (`pip install "dopr-robot[wandb]"`; offline by default, files in RUN/wandb/, upload later with
`wandb sync RUN/wandb/offline-run-*`; set WANDB_MODE=online to stream). A mirror gets exactly the records
metrics.jsonl gets: every numeric key of a record becomes a scalar at the record's `step`.
"""

from __future__ import annotations

import importlib
import math
import os
import uuid
from pathlib import Path
from typing import Any

from dopr_robot.errors import UserError
from dopr_robot.fileio import append_jsonl, write_text

LOGGERS = ("none", "tensorboard", "wandb")
_REQUIRES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}


def check_logger_available(kind: str) -> None:
    """Raise UserError naming the extra to install when `kind`'s package is missing (call before any write)."""
    for module in _REQUIRES.get(kind, ()):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"train.logger={kind} needs the {kind} package ({e}): "
                            f"pip install \"dopr-robot[{kind}]\", or set train.logger=none") from None


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a record, `step` excluded (bools and non-finite values stay in the JSONL only)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class MetricsLogger:
    """One record per log step to RUN/metrics.jsonl (the `none` logger); subclasses mirror each record."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"

    def log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)
        self._mirror(record)

    def log_video(self, path: Path, step: int, tag: str = "rollout") -> None:
        """An MP4 written at `step` (e.g. an in-training evaluation's episode); metrics.jsonl does not hold it."""

    def close(self) -> None:
        pass

    def _mirror(self, record: dict[str, Any]) -> None:
        pass

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardLogger(MetricsLogger):
    """Scalars to RUN/tensorboard/ (torch's SummaryWriter). After a resume from step S, events past S that an
    interrupted process had written are dropped (`purge_step`), as metrics.jsonl drops its records past S."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        super().__init__(run_dir)
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step else None
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)

    def _mirror(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()  # a dashboard sees each record now, and a crash loses none

    def log_video(self, path: Path, step: int, tag: str = "rollout") -> None:
        # TensorBoard plays videos only as GIFs encoded by moviepy; it gets the episode's last frame instead.
        import imageio.v2 as imageio

        with imageio.get_reader(path, format="FFMPEG") as reader:
            last = None
            for last in reader:
                pass
        if last is not None:
            self.writer.add_image(f"{tag}/last_frame", last, global_step=step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(MetricsLogger):
    """Scalars (and videos) to a Weights & Biases run in RUN/wandb/, offline unless WANDB_MODE says otherwise.

    The run id is kept in RUN/wandb_id.txt, so `train --resume` continues the same W&B run."""

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None = None):
        super().__init__(run_dir)
        os.environ.setdefault("WANDB_MODE", "offline")  # works without an account or network
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_path = self.run_dir / "wandb_id.txt"
        if resume_step is not None and id_path.is_file():
            run_id = id_path.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # an identifier, not an experimental choice: recorded, not seeded
            write_text(id_path, run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dopr-robot"), name=self.run_dir.name,
                              id=run_id, resume="allow", dir=str(self.run_dir), config=config)

    def _mirror(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def log_video(self, path: Path, step: int, tag: str = "rollout") -> None:
        self.run.log({tag: self.wandb.Video(str(path), format="mp4")}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_logger(kind: str, run_dir: Path, config: dict[str, Any], resume_step: int | None = None) -> MetricsLogger:
    """The logger `train.logger` names. `resume_step`: the step a resumed run continues from (None: new run)."""
    if kind not in LOGGERS:
        raise UserError(f"train.logger must be one of {', '.join(LOGGERS)}; got {kind!r}")
    check_logger_available(kind)
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir, resume_step)
    if kind == "wandb":
        return WandbLogger(run_dir, config, resume_step)
    return MetricsLogger(run_dir)
