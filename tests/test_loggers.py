"""train.logger: metrics.jsonl always; TensorBoard / W&B mirrors hold exactly its records (real short runs)."""

import json
import math
import struct
import sys

import numpy as np
import pytest

from dopr_robot.config import load_config
from dopr_robot.errors import UserError
from dopr_robot.training import train
from dopr_robot.training.loggers import TensorBoardLogger, check_logger_available

TINY = ["policy.mlp.hidden_dim=64", "policy.mlp.num_layers=2", "train.batch_size=32", "train.log_every=5",
        "train.val_every=10", "train.warmup_steps=5", "train.steps=10", "optim.name=dopr"]


def records_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def numeric(record):
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def test_tensorboard_event_files_hold_the_jsonl_scalars(tmp_path, lift_demos):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'dopr-robot[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(load_config(None, [f"data.path={lift_demos}", *TINY, "train.logger=tensorboard"]), tmp_path / "run",
                progress=False)
    records = records_of(run)
    assert [r["step"] for r in records] == [5, 10]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected = {}
    for record in records:
        for key, value in numeric(record).items():
            expected.setdefault(key, []).append((record["step"], value))
    # DoPr health keys are mirrored too (which ones depends on the per-layer AP path main's DoPr picks by flop
    # count: at these sizes no layer takes the primal path, whose spectrum gives ap_cond/...)
    assert "val_loss" in expected and any(k.startswith("ap_layers_") for k in expected)
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for key, series in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in series], key
        np.testing.assert_allclose([v for _, v in got], [v for _, v in series], rtol=1e-6, err_msg=key)


def test_tensorboard_logger_shows_a_video_as_its_last_frame(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'dopr-robot[tensorboard]')")
    import imageio_ffmpeg
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    video = tmp_path / "3_failure.mp4"
    writer = imageio_ffmpeg.write_frames(str(video), (48, 32), fps=20, macro_block_size=2)
    writer.send(None)
    for value in (0, 128, 255):
        writer.send(np.full((32, 48, 3), value, dtype=np.uint8))
    writer.close()
    logger = TensorBoardLogger(tmp_path / "run")
    logger.log_video(video, step=40)
    logger.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    (image,) = events.Images("rollout/last_frame")
    assert (image.step, image.width, image.height) == (40, 48, 32)


def wandb_history(path):
    """The `history` rows of an offline W&B run file (LevelDB log format: 32 KiB blocks of CRC/length/type
    chunks after a 7-byte `:W&B` header, each record a wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_jsonl_scalars(tmp_path, lift_demos, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (optional: pip install 'dopr-robot[wandb]')")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default must be offline: no account, no network
    run = train(load_config(None, [f"data.path={lift_demos}", *TINY, "train.logger=wandb"]), tmp_path / "run",
                progress=False)
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(log)
    assert [h["_step"] for h in history] == [5, 10]
    for row, record in zip(history, records_of(run)):
        logged = {k: v for k, v in row.items() if not k.startswith("_")}
        assert logged.keys() == numeric(record).keys()
        np.testing.assert_allclose([logged[k] for k in logged], [numeric(record)[k] for k in logged], rtol=1e-12)


def test_missing_logger_package_is_one_error_naming_the_extra(tmp_path, lift_demos, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` sees when it is absent
    with pytest.raises(UserError, match=r"pip install \"dopr-robot\[tensorboard\]\""):
        check_logger_available("tensorboard")
    with pytest.raises(UserError, match="train.logger=tensorboard needs the tensorboard package"):
        train(load_config(None, [f"data.path={lift_demos}", *TINY, "train.logger=tensorboard"]), tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run").exists()  # nothing written


def test_default_logger_writes_only_jsonl(tmp_path, lift_demos):
    run = train(load_config(None, [f"data.path={lift_demos}", *TINY, "train.steps=5"]), tmp_path / "run",
                progress=False)
    assert len(records_of(run)) == 1
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()


def test_unknown_logger_is_rejected():
    with pytest.raises(UserError, match="train.logger must be one of none, tensorboard, wandb"):
        load_config(None, ["train.logger=mlflow"])
