# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t ghcr.io/llmtrain/llmtrain-operator:0.1.0 .
#   docker build --target runtime  -t ghcr.io/llmtrain/llmtrain:0.1.0 .
# `operator` is what the Helm chart (charts/llmtrain) runs: Kopf and urllib3 (no Kubernetes client),
# no torch (~150 MB instead of several GB, and no CUDA libraries to patch).
# `runtime` is every Ray head/worker pod's image (spec.resources.image): torch pinned to the
# Makefile's TORCH, then the project's `runtime` extra, with `ray` and `llmtrain` on PATH.
# tests/unit/test_helm_chart.py checks this structure (no Docker engine in CI).

ARG PYTHON_VERSION=3.11

# ----------------------------------------------------------------------------- base
FROM python:${PYTHON_VERSION}-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/llmtrain \
    PATH=/opt/llmtrain/bin:$PATH
# A fixed numeric non-root user: the chart's runAsUser and Kubernetes' runAsNonRoot check
# both need a number, not a name.
RUN groupadd --gid 65532 llmtrain \
 && useradd --uid 65532 --gid 65532 --create-home --home-dir /home/llmtrain --shell /bin/bash llmtrain \
 && python -m venv /opt/llmtrain

# ----------------------------------------------------------------------------- wheel
# The project is built into a wheel once; the images install the wheel, never the source
# tree (no tests, benchmarks or .git in an image).
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY llmtrain/ llmtrain/
COPY operator/ operator/
COPY runtime/ runtime/
RUN pip wheel --no-deps --wheel-dir /wheels .

# ----------------------------------------------------------------------------- operator
FROM base AS operator
COPY --from=wheel /wheels /wheels
# The `operator` extra only: pydantic, Kopf, urllib3, prometheus-client. No torch, no ray.
RUN pip install "$(ls /wheels/llmtrain-*.whl)[operator]" \
 && rm -rf /wheels
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 9090
ENTRYPOINT ["llmtrain"]
CMD ["operator"]

# ----------------------------------------------------------------------------- runtime
FROM base AS runtime
# The operator's pod command is `/bin/bash -c "ulimit -n 65536; exec ray start ..."`:
# bash is in the slim image already, nothing else from apt is needed.
# The same torch build as the Makefile's TORCH and pyproject's runtime extra, installed
# first and alone so resolving the extra can never swap it for another build.
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==2.11.0"
COPY --from=wheel /wheels /wheels
RUN pip install "$(ls /wheels/llmtrain-*.whl)[runtime]" \
 && rm -rf /wheels \
 && ray --version \
 && python -c "import torch, llmtrain.runtime; assert torch.__version__.split('+')[0] == '2.11.0', torch.__version__"
USER 65532:65532
ENV HOME=/home/llmtrain
WORKDIR /home/llmtrain
# Ray head/worker ports (KubeRay's defaults): GCS, dashboard/Jobs, client, metrics, agent.
EXPOSE 6379 8265 10001 8080 52365
CMD ["ray", "--help"]
