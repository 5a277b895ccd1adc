"""The one provenance record: the shared keys every output embeds, its optional parts, and package versions for
a package installed without dist-info (a source checkout on sys.path, as robosuite often is)."""

import hashlib
import json
import sys

from dopr_robot.provenance import _module_version, file_sha256, package_versions, provenance


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
