# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t ghcr.io/llmtrain/llmtrain-operator:0.1.0 .
#   docker build --target runtime  -t ghcr.io/llmtrain/llmtrain:0.1.0 .
# or, with no Docker engine and no registry: `make images` (tools/images.sh: buildah, on a
# Debian base made locally, written as archives for `ctr images import`).
# `operator` is what the Helm chart (charts/llmtrain) runs: Kopf and urllib3 (no Kubernetes client),
# no torch (~300 MB instead of 6 GB, and no CUDA libraries to patch).
# `runtime` is every Ray head/worker pod's image (spec.resources.image): torch pinned to the
# Makefile's TORCH, then the project's `runtime` extra, with `ray` and `llmtrain` on PATH.
# tests/unit/test_helm_chart.py checks this structure; tests/integration/test_images.py the
# built archives.
#
# Layer order is for rebuild time: torch (~3 GB of CUDA wheels) first and alone, then the
# third-party dependencies listed from pyproject.toml, and only then the project's own
# wheel, so a change to Python code rebuilds the wheel and one small layer per image.

# Any Debian-like image with python3 (>= 3.11), python3-venv, bash, useradd and CA
# certificates: python:slim keeps python in /usr/local/bin, Debian's python3 package in
# /usr/bin; everything below calls `python3` from PATH and then the venv's own.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ----------------------------------------------------------------------------- base
FROM ${BASE_IMAGE} AS base
# PIP_CERT: pip trusts the system's CA store (Debian's ca-certificates, in both bases)
# instead of its own certifi copy, so a build behind a TLS-inspecting proxy only has to
# provide that store (tools/images.sh bind-mounts the host's over it for RUN steps).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    VIRTUAL_ENV=/opt/llmtrain \
    PATH=/opt/llmtrain/bin:$PATH
# A fixed numeric non-root user: the chart's runAsUser and Kubernetes' runAsNonRoot check
# both need a number, not a name.
RUN groupadd --gid 65532 llmtrain \
 && useradd --uid 65532 --gid 65532 --create-home --home-dir /home/llmtrain --shell /bin/bash llmtrain \
 && python3 -m venv /opt/llmtrain

# ----------------------------------------------------------------------------- wheel
# The project is built into a wheel once; the images install the wheel, never the source
# tree (no tests, benchmarks or .git in an image). pyproject.toml is also turned into one
# requirements file per image here: the images copy those files, whose content (not
# pyproject's, which changes with the test extra too) keys their dependency layers. The
# build backend (pinned by build-system) is installed before the sources are copied, so a
# code change does not download it again.
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
RUN mkdir /reqs \
 && python -c "import tomllib; t = tomllib.load(open('pyproject.toml', 'rb')); p = t['project']; w = lambda n, r: open(f'/reqs/{n}.txt', 'w').write('\n'.join(r) + '\n'); w('build', t['build-system']['requires']); [w(x, p['dependencies'] + p['optional-dependencies'][x]) for x in ('operator', 'runtime')]" \
 && pip install -r /reqs/build.txt
COPY llmtrain/ llmtrain/
COPY operator/ operator/
COPY runtime/ runtime/
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# ----------------------------------------------------------------------------- operator
FROM base AS operator
# The dependencies first: this layer survives code changes.
COPY --from=wheel /reqs/operator.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
# The `operator` extra only: pydantic, Kopf, urllib3, prometheus-client. No torch, no ray.
# Everything is installed already; this adds the project and checks the extra resolves.
RUN pip install "$(ls /wheels/llmtrain-*.whl)[operator]" \
 && rm -rf /wheels
USER 65532:65532
# HOME is set in the image, not left to the runtime's /etc/passwd lookup: Kopf, Ray and
# matplotlib write under it, whatever uid a pod runs as. Only after USER, so nothing run as
# root during the build leaves root-owned files there.
ENV HOME=/home/llmtrain
WORKDIR /tmp
EXPOSE 8080 9090
ENTRYPOINT ["llmtrain"]
CMD ["operator"]

# ----------------------------------------------------------------------------- runtime
FROM base AS runtime
# The operator's pod command is `/bin/bash -c "ulimit -n 65536; exec ray start ..."`:
# bash is in both bases already, nothing else from apt is needed.
# The same torch build as the Makefile's TORCH and pyproject's runtime extra, installed
# first and alone so resolving the extra can never swap it for another build.
# Downloads go to a wheelhouse on a build cache mount (not a layer), and are installed from
# there: when this layer is rebuilt (a new base), the ~3 GB of wheels are not downloaded
# again. pip's own HTTP cache would not do: it keeps only responses whose Cache-Control
# allows it, which a proxy may strip.
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN --mount=type=cache,target=/var/cache/wheelhouse,sharing=locked \
    torch="torch==2.11.0" \
 && pip download --dest /var/cache/wheelhouse --index-url "${TORCH_INDEX_URL}" "$torch" \
 && pip install --no-index --find-links /var/cache/wheelhouse "$torch"
COPY --from=wheel /reqs/runtime.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/var/cache/wheelhouse,sharing=locked \
    pip download --dest /var/cache/wheelhouse -r /tmp/requirements.txt \
 && pip install --no-index --find-links /var/cache/wheelhouse -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
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
