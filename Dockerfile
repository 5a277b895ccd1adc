# GPU image for dopr-robot jobs (train, eval, sweep, compare, diagnose). Not built on the development machine
# (no Docker engine there); tests/test_docker.py lints it with hadolint and checks it against pyproject.toml.
#   docker build -t dopr-robot .
#   docker run --gpus all -v $PWD/data:/work/data -v $PWD/runs:/work/runs dopr-robot train --config configs/lift.yaml
#
# torch comes from the base image (a CUDA build; pyproject.toml asks for torch>=2.9). Everything else is installed
# from the project itself, so its pins (robosuite, mujoco, numpy, ...) are pyproject's and cannot drift here.
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

# Headless MuJoCo through EGL (glvnd). With --gpus all the NVIDIA container toolkit mounts the driver's
# libEGL_nvidia only when the "graphics" capability is requested; the vendor file points glvnd at it.
# Numba (robosuite) caches compiled kernels: the site-packages it lives in is not writable by the run user.
ENV MUJOCO_GL=egl \
    PYOPENGL_PLATFORM=egl \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Distribution packages are not version-pinned: the base image fixes the Ubuntu release, whose archive only
# carries security updates of these libraries.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libegl1 libgl1 libglvnd0 libglx0 libgles2 libopengl0 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /usr/share/glvnd/egl_vendor.d \
    && printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "libEGL_nvidia.so.0"}}\n' \
        > /usr/share/glvnd/egl_vendor.d/10_nvidia.json

# The project, installed (not editable) with pyproject's own requirements; the constraint holds torch at the
# base image's build (its version as pip sees it, local label included) so pip can never swap it for a CPU wheel
# or another CUDA version. The import check runs as root: anything it caches under /tmp is removed so the run
# user can create its own.
WORKDIR /opt/dopr-robot
COPY pyproject.toml README.md ./
COPY dopr_robot ./dopr_robot
RUN python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt . \
    && python -c "import torch, mujoco, robosuite, dopr_robot; print(torch.__version__, mujoco.__version__, robosuite.__version__)" \
    && rm -rf /tmp/torch-constraint.txt /tmp/numba-cache

# Runs as the unprivileged user dopr (uid 1000; USER is numeric so the host can resolve it). WORKDIR /work mirrors
# a checkout: configs/ ships in the image, and the configs' relative data/ and runs/ paths land in the two volumes
# (mount the host's data/ and runs/ there).
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash dopr \
    && mkdir -p /work/data /work/runs \
    && chown -R dopr:dopr /work
COPY --chown=dopr:dopr configs /work/configs
USER 1000:1000
WORKDIR /work
VOLUME ["/work/data", "/work/runs"]
ENTRYPOINT ["dopr-robot"]
CMD ["--help"]
