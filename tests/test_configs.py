"""Every shipped config loads and validates; the built-in defaults are the documented Lift quickstart."""

from pathlib import Path

import pytest

from dopr_robot.config import Config, load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.task in cfg.data.path or cfg.data.path.startswith("data/")


def test_lift_yaml_spells_out_the_defaults():
    assert load_config(CONFIG_DIR / "lift.yaml").to_dict() == Config().to_dict()


def test_hard_configs_collect_imperfect_demos():
    hard = load_config(CONFIG_DIR / "lift_hard.yaml")
    assert hard.data.collect_noise == 1.0 and hard.data.collect_episodes == 50
