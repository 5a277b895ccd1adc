"""The cells of a sweep: optimizer x grid point x training seed, each a normal run directory named from its settings.

Name: `<optim>[_<key>-<value>...]_s<seed>`, key = last component of the dotted grid key, value = the grid value as
typed with separators folded to '-' (e.g. `dopr_damping-3_s2`, `adam_down_dims-16-32_s0`). Every optimizer gets the
same grid points and the same seeds (fair tuning), and cells are ordered seed-major, so a sweep stopped half-way has
the same seeds done for every optimizer. Cells that would train the same run (their resolved configs equal but for
keys their optimizer never reads, e.g. AdamW across a damping grid) run once, as the first of them (`distinct_cells`).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dopr_robot.config import CHOICES, Config, effective_config, load_config
from dopr_robot.errors import UserError

PERTURBATIONS = {"action_noise": "--action-noise", "obs_noise": "--obs-noise", "push": "--push"}
RESERVED_KEYS = {"optim.name": "--optims", "train.seed": "--seeds"}


@dataclass
class Cell:
    optim: str
    seed: int
    settings: dict[str, str] = field(default_factory=dict)  # dotted grid key -> value text, as on the command line

    @property
    def name(self) -> str:
        parts = [f"{key.rsplit('.', 1)[-1]}-{value_slug(value)}" for key, value in self.settings.items()]
        return "_".join([self.optim, *parts, f"s{self.seed}"])

    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.settings.items()]


def value_slug(value: str) -> str:
    """A grid value as a path-safe name part: list/space separators -> '-', other unsafe characters dropped."""
    return re.sub(r"[^A-Za-z0-9._+-]", "", re.sub(r"[,\s/:]+", "-", value.strip()))


def split_values(text: str) -> list[str]:
    """Split `v1,v2,...` on top-level commas only, so list values survive: `[16,32],[32,64]` -> 2 values."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_optims(text: str) -> list[str]:
    optims = list(dict.fromkeys(o.strip() for o in text.split(",") if o.strip()))
    allowed = CHOICES["optim.name"]
    if not optims:
        raise UserError("--optims names no optimizer")
    for optim in optims:
        if optim not in allowed:
            raise UserError(f"--optims: unknown optimizer {optim!r} (choose from {', '.join(allowed)})")
    return optims


def parse_seeds(text: str) -> list[int]:
    """`0-4` -> 0..4 inclusive; `0,2,7`; `0-2,9`."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise UserError(f"--seeds expects non-negative integers and ranges like 0-4 or 0,2,5; got {text!r}")
        last = int(match[2]) if match[2] is not None else int(match[1])
        seeds.extend(range(int(match[1]), last + 1))
    return list(dict.fromkeys(seeds))


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2` (repeatable) -> {key: [v1, v2]}, keys in command-line order."""
    grid: dict[str, list[str]] = {}
    short: dict[str, str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise UserError(f"--grid expects key=v1,v2,...; got {item!r}")
        if key in RESERVED_KEYS:
            raise UserError(f"--grid {key}: use {RESERVED_KEYS[key]} for that")
        if key in grid:
            raise UserError(f"--grid {key} given twice; list all its values in one --grid")
        last = key.rsplit(".", 1)[-1]
        if last in short:
            raise UserError(f"--grid keys {short[last]} and {key} would give the same cell-name part {last!r}")
        values = split_values(text)
        slugs = [value_slug(v) for v in values]
        if any(not v or not s for v, s in zip(values, slugs)):
            raise UserError(f"--grid {key}: empty value in {text!r}")
        if len(set(slugs)) != len(slugs):
            raise UserError(f"--grid {key}: values {values} are repeated or give the same cell name")
        grid[key], short[last] = values, key
    return grid


def parse_perturb(items: list[str]) -> dict[str, list[float]]:
    """`name=v1,v2` with name in action_noise | obs_noise | push -> {name: [levels]} (each level one eval report)."""
    perturb: dict[str, list[float]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in PERTURBATIONS:
            raise UserError(f"--perturb expects NAME=v1,v2 with NAME one of {', '.join(PERTURBATIONS)}; got {item!r}")
        try:
            levels = [float(v) for v in split_values(text)]
        except ValueError:
            raise UserError(f"--perturb {name}: levels must be numbers; got {text!r}") from None
        if any(not 0 <= v < float("inf") for v in levels) or (name == "push" and any(v > 1 for v in levels)):
            raise UserError(f"--perturb {name}: levels must be >= 0 (push: a probability in [0, 1]); got {text!r}")
        perturb[name] = list(dict.fromkeys(levels))
    return perturb


def perturb_tag(name: str, level: float) -> str:
    return f"{name}{level:g}"


def enumerate_cells(optims: list[str], grid: dict[str, list[str]], seeds: list[int]) -> list[Cell]:
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [Cell(optim, seed, point) for seed in seeds for point in points for optim in optims]


def distinct_cells(cells: list[Cell], configs: dict[str, Config]) -> tuple[list[Cell], dict[str, str]]:
    """The cells whose resolved configs differ (`effective_config`: keys the cell's optimizer never reads left
    out), the first of equal ones kept; and {dropped cell: the kept cell it equals}. E.g. a grid over
    optim.ap.damping gives AdamW one cell per seed, not one per damping value."""
    kept: dict[str, Cell] = {}
    same: dict[str, str] = {}
    for cell in cells:
        key = json.dumps(effective_config(configs[cell.name]), sort_keys=True, default=str)
        if key in kept:
            same[cell.name] = kept[key].name
        else:
            kept[key] = cell
    return list(kept.values()), same


def check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in RESERVED_KEYS:
            raise UserError(f"--set {key}: use {RESERVED_KEYS[key]} for that")


def cell_config(config: Path | None, overrides: list[str], cell: Cell) -> Config:
    """The cell's full config, exactly as its `train` will load it: file <- --set <- grid point <- optim, seed."""
    try:
        return load_config(config, [*overrides, *cell.overrides(), f"optim.name={cell.optim}",
                                    f"train.seed={cell.seed}"])
    except UserError as e:
        raise UserError(f"cell {cell.name}: {e}") from None
