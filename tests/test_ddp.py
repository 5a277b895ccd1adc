"""`torchrun --nproc_per_node 2 -m dopr_robot train` on CPU (gloo): each rank trains on half of every global
batch, and the result is the single-process result on the whole batch, up to float summation order."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from dopr_robot.config import load_config
from dopr_robot.training import train
from tiny_data import TINY_TRAIN, write_tiny_hdf5

STEPS = ["train.steps=4", "train.checkpoint_every=2"]


@pytest.mark.parametrize("optim", ["adam", "dopr"])
def test_two_processes_match_one_process_on_the_full_batch(tmp_path, optim):
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed beside this python")
    dataset = write_tiny_hdf5(tmp_path / "tiny.hdf5")
    # Under DDP DoPr computes M on the primal path (S is all-reduced, Z is not); the single process is held to the
    # same path, so the two runs differ only in summation order (each path is tested against a direct solve in
    # test_optim.py; Adam's normalized step would turn their float32 rounding differences into visible ones).
    sets = [f"optim.name={optim}", "optim.ap.path=primal", *TINY_TRAIN, *STEPS]
    single = train(load_config(None, [f"data.path={dataset}", *sets]), tmp_path / "single", progress=False)

    run = tmp_path / "ddp"
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2",
               "-m", "dopr_robot", "train", "--dataset", str(dataset), "--out", str(run)]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.count("trained ->") == 1  # only rank 0 speaks (and writes)

    a = torch.load(single / "trainer_state.pt", weights_only=False)
    b = torch.load(run / "trainer_state.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for name, value in a["policy"].items():
        assert torch.allclose(value, b["policy"][name], rtol=1e-4, atol=1e-5), name
    ema_a = load_file(str(single / "checkpoints" / "final.safetensors"))
    ema_b = load_file(str(run / "checkpoints" / "final.safetensors"))
    assert all(torch.allclose(ema_a[k], ema_b[k], rtol=1e-4, atol=1e-5) for k in ema_a)
    losses = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()]
              for r in (single, run)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)  # rank 0 logs the global batch's loss
    # the weights moved between steps 2 and 4: the match is not that of two untouched copies
    ema_b2 = load_file(str(run / "checkpoints" / "step_0000002.safetensors"))
    assert any(not torch.allclose(ema_b2[k], ema_b[k], rtol=1e-4, atol=1e-5) for k in ema_b)
    assert {p.name for p in single.iterdir()} <= {p.name for p in run.iterdir()}  # rank 0 wrote a whole run
