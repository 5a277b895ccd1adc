"""`dopr-robot render-obs IN OUT --cameras ... --size N`: image observations for a demonstration file that has
MuJoCo states (robomimic's dataset_states_to_obs, for this tool).

For every demo and step t the environment the file's env_args describe, with the demo's model (objects sized at
reset, such as Lift's cube, are in no state vector), is set to `states[t]` and each camera is rendered (`envs.render.render_camera`, the helper `collect --cameras` and evaluation render with, so the frames
are the ones those would see at the same state). OUT is IN with `obs/<camera>_image` added to every demo
(uint8 (T, N, N, 3), one frame per chunk, gzip) and the cameras and size in data.attrs; IN is only read. OUT
appears complete or not at all (written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from dopr_robot.datasets.images import camera_of, image_chunks, image_key, is_image_array
from dopr_robot.datasets.robomimic_hdf5 import RobomimicFile
from dopr_robot.datasets.zarr_store import is_zarr
from dopr_robot.envs.render import ImageSpec, check_image_size, image_attrs
from dopr_robot.errors import UserError
from dopr_robot.fileio import atomic_path
from dopr_robot.progress import progress_bar


def render_obs(src: str | Path, out: str | Path, cameras: tuple[str, ...], size: int, progress: bool = True) -> dict:
    from dopr_robot.envs import make_env

    src, out = Path(src), Path(out)
    if is_zarr(src):
        raise UserError(f"render-obs reads robomimic HDF5 files; convert {src} first (dopr-robot convert IN OUT.hdf5)")
    if out.exists() and out.resolve() == src.resolve():
        raise UserError("OUT must differ from IN: render-obs never modifies its input")
    spec = ImageSpec(tuple(cameras), check_image_size(size), size)
    keys = [image_key(c) for c in spec.cameras]
    # --- every check before anything is written: states in every demo, no key rendered twice, the cameras exist
    with RobomimicFile(src) as f:
        env_args = f.env_args
        made_by_collect = "collect_seed" in f.attrs
        lengths = {}
        for demo in f.demos:
            g = f.data[demo]
            if "states" not in g:
                raise UserError(f"dataset {src}, {demo}: no 'states' (MuJoCo states are what render-obs renders)")
            others = {k: g["obs"][k].shape[1:3] for k in (g["obs"] if "obs" in g else [])
                      if is_image_array(g["obs"][k].shape, g["obs"][k].dtype)}
            mismatched = [k for k, hw in others.items() if tuple(hw) != (size, size)]
            if mismatched:
                h, w = others[mismatched[0]]
                raise UserError(f"dataset {src}, {demo}: obs/{mismatched[0]} is {h}x{w}; render at --size {h} so "
                                f"the file holds one image size")
            have = [k for k in keys if k in others]
            existing = sorted(others)
            if have:
                raise UserError(f"dataset {src}, {demo}: already has obs/{have[0]}; render other cameras, or start "
                                f"from the file without images")
            lengths[demo] = int(g["states"].shape[0])
    env = make_env(env_args, images=spec)  # an unknown camera is one error line here
    start = time.time()
    bar = progress_bar(total=sum(lengths.values()), desc="render-obs", unit="frame", enabled=progress)
    try:
        with atomic_path(out, suffix=".hdf5") as tmp:
            shutil.copyfile(src, tmp)
            with h5py.File(tmp, "r+") as f:
                data = f["data"]
                for demo, steps in lengths.items():
                    states = np.asarray(data[demo]["states"][()])
                    model_xml = _load_demo_model(env, data[demo].attrs, made_by_collect)
                    arrays = {k: data[demo].create_dataset(f"obs/{k}", shape=(steps, spec.height, spec.width, 3),
                                                           dtype=np.uint8, chunks=image_chunks((steps, size, size, 3)),
                                                           compression="gzip")
                              for k in keys}
                    for t in range(steps):
                        obs = env.restore(states[t], model_xml)
                        for k in keys:
                            arrays[k][t] = obs[k]
                        bar.update(1)
                for name, value in image_attrs(spec).items():
                    data.attrs[name] = value
                # cameras already in the file (rendered earlier, at this size) stay listed
                data.attrs["image_cameras"] = json.dumps(sorted(camera_of(k) for k in existing) + list(spec.cameras))
    finally:
        bar.close()
        env.close()
    return {"demos": len(lengths), "frames": sum(lengths.values()) * len(keys), "cameras": list(spec.cameras),
            "size": size, "seconds": time.time() - start, "out": str(out)}


def _load_demo_model(env, attrs, made_by_collect: bool) -> str | None:
    """Give `env` the model the demo was recorded with. Demos of `collect` record the seed that drew it: a reset
    with that seed rebuilds it exactly. Other files (robomimic's) record the model itself (`model_file`), whose
    XML keeps sizes to ~1e-7 m, enough for the odd pixel to differ. Returns the XML for `env.restore`, or None."""
    if made_by_collect and "seed" in attrs:
        env.reset(int(attrs["seed"]))
        return None
    model_xml = attrs.get("model_file")
    return model_xml.decode() if isinstance(model_xml, bytes) else model_xml
