"""Videos of evaluation episodes: which seeds to record, the per-episode recorder, MP4 files beside the report.

`eval --videos N` records the first N episodes (by seed) while they run. `--videos-failed N` records up to N
failed episodes; whether an episode fails is known only when it ends, so the failed seeds not already recorded
are run a second time, with recording, after all episodes have run. An episode is a function of its seed alone
(initial state and sampling noise both come from it), and rendering only reads the simulation, so the second
run is the same episode; its outcome is checked against the first and any difference is reported.

Frames come from a separate environment built with an offscreen renderer, in the same worker process, and only
for recorded episodes: the others run at full speed. Episodes run in blocks (`lockstep`), and an episode's
result depends on its block, so a failed seed is re-run with its whole block (only its video is kept). One RGB frame is captured after reset and after every
step (steps + 1 frames) and streamed into an H.264 MP4 (imageio-ffmpeg, which bundles its ffmpeg binary) at
the environment's control frequency, so the video plays in real time. A file appears under its final name
`<seed>_<success|failure>.mp4` only when complete (written under a temporary name, then renamed). The videos
directory belongs to its report: when a fresh evaluation archives an earlier report, the directory is archived
with it under the same suffix and the archived report's paths are rewritten (`archive.archive_report`).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dopr_robot.envs.render import RenderSpec, check_rendering
from dopr_robot.errors import UserError, error_summary

FIRST, FAILED = "first", "failed"  # why an episode was recorded


def videos_dir_for(report: Path) -> Path:
    """RUN/eval.json -> RUN/videos; RUN/eval_<tag>.json (or any other report name) -> RUN/videos_<tag>."""
    stem = report.stem
    return report.with_name("videos" if stem == "eval" else f"videos_{stem.removeprefix('eval_')}")


def video_name(seed: int, success: bool) -> str:
    return f"{seed}_{'success' if success else 'failure'}.mp4"


class VideoRecorder:
    """Streams one episode's frames into an MP4. `capture(env)` is `run_episode`'s recorder hook.

    Use as a context manager: leaving it without `finish` (an episode that raised) deletes the partial file.
    A recorder failure (rendering, ffmpeg, the disk) never fails its episode: the recorder stops, keeps the
    reason in `error`, leaves no file, and the episode's result stands (its video is reported missing).
    """

    def __init__(self, env, directory: Path, seed: int, fps: float):
        import imageio_ffmpeg

        self.env, self.directory, self.seed, self.fps = env, Path(directory), seed, fps
        self.frames = 0
        self.path: Path | None = None
        self.error: str | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{seed}.", suffix=".mp4.tmp", dir=self.directory)
        os.close(fd)
        self._tmp = Path(tmp)
        height, width = env.render_spec.height, env.render_spec.width
        # The temporary name does not end in .mp4, so the container is named explicitly (-f mp4).
        # macro_block_size=2: keep the exact frame size (sizes are even); the default 16 would rescale.
        self._writer = imageio_ffmpeg.write_frames(str(self._tmp), (width, height), fps=fps, codec="libx264",
                                                   pix_fmt_out="yuv420p", macro_block_size=2,
                                                   output_params=["-f", "mp4", "-threads", "1"])
        self._writer.send(None)  # starts ffmpeg

    def capture(self, env) -> None:
        if self.error is not None:
            return
        try:
            self._writer.send(env.render_frame())
            self.frames += 1
        except Exception as e:  # noqa: BLE001 - see the class docstring
            self._fail(e)

    def finish(self, success: bool) -> Path | None:
        """Close the file and give it its final name; a stale file of the other outcome for this seed goes.
        None when recording failed (`error` says why)."""
        if self.error is not None:
            return None
        try:
            self._writer.close()  # waits for ffmpeg to finish the file
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp, 0o666 & ~umask)
            path = self.directory / video_name(self.seed, success)
            os.replace(self._tmp, path)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            self._fail(e)
            return None
        self.path = path
        (self.directory / video_name(self.seed, not success)).unlink(missing_ok=True)
        return self.path

    def _fail(self, error: BaseException) -> None:
        self.error = error_summary(error)
        self._discard()

    def _discard(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - a broken writer is being thrown away
            pass
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoRecorder":
        return self

    def __exit__(self, *exc) -> None:
        if self.path is None:
            self._discard()


@dataclass(frozen=True)
class VideoPlan:
    """Which episodes of one evaluation get a video, and where the videos go (built in the main process; the
    pool's workers get it with each task, see `pool.EpisodeSettings.video`)."""

    spec: RenderSpec
    directory: Path
    first_seeds: frozenset[int]  # --videos N: the first N seeds
    failed: int  # --videos-failed N
    fps: float

    @classmethod
    def create(cls, seeds: list[int], videos: int, videos_failed: int, spec: RenderSpec, directory: Path,
               env_args: dict[str, Any]) -> "VideoPlan | None":
        if not videos and not videos_failed:
            return None
        fps = float(env_args.get("render_fps") or env_args.get("env_kwargs", {}).get("control_freq", 20))
        return cls(spec, Path(directory), frozenset(seeds[:videos]), videos_failed, fps)

    def preflight(self, env_args: dict[str, Any], seed: int) -> float:
        """Before any episode runs: render one frame and encode a short MP4 (UserError naming the fix when
        either does not work here). Returns the seconds the frame took to render."""
        seconds = check_rendering(env_args, self.spec, seed)
        try:
            import imageio_ffmpeg

            with tempfile.TemporaryDirectory() as tmp:
                writer = imageio_ffmpeg.write_frames(str(Path(tmp) / "check.mp4"), (self.spec.width, self.spec.height),
                                                     macro_block_size=2, output_params=["-threads", "1"])
                writer.send(None)
                writer.send(np.zeros((self.spec.height, self.spec.width, 3), dtype=np.uint8))
                writer.close()
        except Exception as e:  # ImportError, no ffmpeg binary for this platform, ffmpeg failing
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"MP4 encoding does not work here ({detail}); pip install imageio-ffmpeg "
                            f"(it ships an ffmpeg binary), or set IMAGEIO_FFMPEG_EXE to an ffmpeg") from None
        return seconds

    def reruns(self, results: dict[int, dict[str, Any]]) -> list[int]:
        """Failed seeds to run again with recording: up to `failed` failures in all, counting those that
        `--videos` recorded already, in seed order."""
        failures = sorted(s for s, r in results.items() if not r["success"] and "error" not in r)
        already = sum(1 for s in failures if s in self.first_seeds)
        return [s for s in failures if s not in self.first_seeds][: max(0, self.failed - already)]

    def listing(self, results: dict[int, dict[str, Any]], reruns: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The report's `videos` entries, by seed, each `path` relative to the report's directory (the videos
        directory's parent); reruns whose outcome differs from the first run say so."""
        report_dir = self.directory.parent
        entries = []
        for seed in sorted(self.first_seeds & set(results)):
            entries.append(self._entry(report_dir, results[seed], FIRST))
        for rerun in reruns:
            first = results[rerun["seed"]]
            entry = self._entry(report_dir, rerun, FAILED)
            if (rerun["success"], rerun["steps"]) != (first["success"], first["steps"]):
                entry["differs_from_first_run"] = {"success": first["success"], "steps": first["steps"]}
                print(f"warning: seed {rerun['seed']} re-run for its video ended differently "
                      f"({rerun['steps']} steps, success {rerun['success']}) than its first run "
                      f"({first['steps']} steps, success {first['success']})", file=sys.stderr)
            entries.append(entry)
        entries = [e for e in entries if (report_dir / e["path"]).is_file()]
        return sorted(entries, key=lambda e: e["seed"])

    def missing(self, results: dict[int, dict[str, Any]], reruns: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The report's `videos_missing`: episodes that were to be recorded but whose recorder failed (the
        episode's result stands), with the reason."""
        wanted = [(results[s], FIRST) for s in sorted(self.first_seeds & set(results))] + \
                 [(r, FAILED) for r in reruns]
        return [{"seed": r["seed"], "reason": reason, "error": r["video_error"]}
                for r, reason in wanted if r.get("video_error")]

    def _entry(self, report_dir: Path, result: dict[str, Any], reason: str) -> dict[str, Any]:
        path = self.directory / video_name(result["seed"], result["success"])
        return {"seed": result["seed"], "success": result["success"], "steps": result["steps"], "reason": reason,
                "path": os.path.relpath(path, report_dir)}
