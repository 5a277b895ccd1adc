"""The one provenance record: the shared keys every output embeds, its optional parts, and package versions for
a package installed without dist-info (a source checkout on sys.path, as robosuite often is); a resumed training
run keeps its original RUN/provenance.json and appends each resumed start to "resumes"."""

import hashlib
import json
import sys

from dopr_robot.provenance import _module_version, file_sha256, package_versions, provenance, run_provenance
from tiny_data import run_cli, train_args, write_tiny_hdf5


def test_provenance_optional_parts(tmp_path):
    data = tmp_path / "demos.hdf5"
    data.write_bytes(b"demo bytes")
    rollouts = tmp_path / "eval_rollouts.hdf5"
    rollouts.write_bytes(b"rollout bytes")
    (tmp_path / "provenance.json").write_text(json.dumps({"git": {"commit": "abc"}}))
    record = provenance(data, command=["dopr-robot", "diagnose", str(tmp_path)], files={"rollouts": rollouts},
                        run_dir=tmp_path)
    assert set(record) == {"git", "packages", "python", "platform", "command", "dataset", "files", "run"}
    assert record["dataset"]["sha256"] == hashlib.sha256(b"demo bytes").hexdigest()
    rollouts_sha = hashlib.sha256(b"rollout bytes").hexdigest()
    assert record["files"]["rollouts"]["sha256"] == file_sha256(rollouts) == rollouts_sha
    assert record["command"]["argv"][1] == "diagnose" and record["command"]["time_utc"].endswith("Z")
    assert record["run"] == {"git": {"commit": "abc"}}
    assert provenance(run_dir=tmp_path / "missing")["run"] is None  # an unreadable run record is None, not an error
    assert set(provenance()) == {"git", "packages", "python", "platform"}


def test_version_of_a_package_without_dist_info(tmp_path, monkeypatch):
    package = tmp_path / "dopr_fake_pkg"
    package.mkdir()
    (package / "__init__.py").write_text('__version__ = "9.8.7"\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _module_version("dopr-fake-pkg") == "9.8.7"
    assert _module_version("dopr_no_such_pkg") is None
    sys.modules.pop("dopr_fake_pkg", None)
    assert package_versions()["numpy"] is not None


def test_resume_keeps_the_original_provenance_and_appends_each_resume(tmp_path):
    data = write_tiny_hdf5(tmp_path / "tiny.hdf5")
    run = tmp_path / "run"
    started = run_cli(*train_args(data, run), "--until", "2")
    assert started.returncode == 0, started.stderr
    original = json.loads((run / "provenance.json").read_text())
    assert "resumes" not in original and "--until" in original["command"]["argv"]

    resumed = run_cli("train", "--out", str(run), "--resume", "--until", "4")
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((run / "provenance.json").read_text())
    assert {k: v for k, v in record.items() if k != "resumes"} == original  # the start's record, unchanged
    assert len(record["resumes"]) == 1
    entry = record["resumes"][0]
    assert entry["step"] == 2 and "--resume" in entry["command"]["argv"]
    assert set(entry) == {"git", "packages", "python", "platform", "command", "dataset", "step"}
    assert entry["dataset"] == original["dataset"]

    assert run_cli("train", "--out", str(run), "--resume").returncode == 0  # a second resume appends
    record = json.loads((run / "provenance.json").read_text())
    assert [r["step"] for r in record["resumes"]] == [2, 4]
    assert {k: v for k, v in record.items() if k != "resumes"} == original
    assert not list(run.glob(".provenance.json.*"))  # written atomically: no temporary file left behind


def test_resume_of_a_run_without_a_readable_provenance_does_not_invent_one(tmp_path):
    (tmp_path / "provenance.json").write_text("{cut short")
    record = run_provenance(tmp_path, tmp_path / "none.hdf5", ["dopr-robot", "train", "--resume"], resume_step=7)
    assert record["original"] is None and [r["step"] for r in record["resumes"]] == [7]
    assert set(run_provenance(tmp_path, tmp_path / "none.hdf5", ["x"])) == {"git", "packages", "python", "platform",
                                                                              "command", "dataset"}
