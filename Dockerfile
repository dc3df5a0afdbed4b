# The wan_spmd image: CUDA 13 runtime, the torch the benchmarks ran (2.11.0+cu130, pinned in
# pyproject.toml's `gpu` extra), the project with its `gpu` and `hopper` extras (FlashAttention-3
# and fp8 kernels for H100/H200). deploy/kubernetes and deploy/slurm run this image:
#   docker build -t registry.example.com/wan-spmd:0.1.0 .
#   docker push registry.example.com/wan-spmd:0.1.0
# The model weights are not in it: mount the diffusers folder and give its path to --model.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    PATH=/opt/venv/bin:$PATH
# A C compiler and Python's headers: Triton builds its launcher at run time (torch.compile, the
# default on CUDA).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from PyTorch's CUDA 13 index (PyPI's wheel of the same version targets another
# CUDA); the project's install then finds the pin satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cu130 torch==2.11.0

WORKDIR /opt/wan_spmd
COPY pyproject.toml README.md ./
COPY wan_spmd ./wan_spmd
COPY configs ./configs
RUN pip install ".[gpu,hopper]" && wan_spmd --help >/dev/null

WORKDIR /work
CMD ["wan_spmd", "--help"]
