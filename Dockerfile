# One image for the operator, the peers, the gradient function and the Redis servers.
#   docker build -t p2ptrain:dev .
#   hack/build-image.sh          (buildah, no Docker engine, no registry: see docs/cluster.md)
# Stage 1 builds a virtualenv with the project and a CPU torch, and the p2ptrain Redis module;
# stage 2 is the slim, non-root runtime that copies them.
#
# BASE_IMAGE: any Debian bookworm image with Python 3.11 and its venv module: the official Python
# image by default, or a local one (hack/build-image.sh makes one with debootstrap where no registry
# is reachable). Both stages use it, so the virtualenv's interpreter links resolve in the runtime.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Where the pinned CPU torch comes from. The default index would pull a multi-GB CUDA build from PyPI.
# A torch-2.13.0+cpu wheel placed in wheels/ (empty in the repository) is used instead, offline: the
# same file either way, so both paths give the same image.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pypi: install PyPI's torch==2.13.0 (the CUDA build, which also runs on CPUs) and its dependencies
# from wheels/, offline: for networks that reach PyPI but neither the CPU index nor a CPU wheel
# (hack/build-image.sh stages them). Several GB larger than the CPU build.
ARG TORCH_VARIANT=cpu
# Build-time only, for networks where a TLS-intercepting proxy sits between the build and PyPI: the
# path of a CA bundle in the build context (hack/build-image.sh puts the host's in wheels/). pip alone
# uses it, in this stage alone: the runtime image never sees it.
ARG PIP_CA_BUNDLE=""
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY wheels ./wheels
COPY pyproject.toml README.md ./
COPY p2ptrain ./p2ptrain
COPY crds ./crds
COPY operator ./operator
# A virtualenv rather than the system site-packages: Debian's Python refuses pip there (PEP 668).
# torch goes in first without its dependencies, so everything else (torch's dependencies included)
# resolves from PyPI the same way whichever source the torch wheel came from.
# p2ptrain/crd.yaml is a symlink to crds/ in the source tree: make it a file inside the wheel.
RUN if [ -n "${PIP_CA_BUNDLE}" ]; then export PIP_CERT="/src/${PIP_CA_BUNDLE}"; fi \
    && python3 -m venv /opt/p2ptrain \
    && expected=2.13.0+cpu \
    && if [ "${TORCH_VARIANT}" = pypi ]; then \
         expected=2.13.0+cu130 \
         && /opt/p2ptrain/bin/pip install --no-cache-dir --no-index --find-links wheels torch==2.13.0; \
       elif ls wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then \
         /opt/p2ptrain/bin/pip install --no-cache-dir --no-deps --no-index --find-links wheels torch==2.13.0; \
       else \
         /opt/p2ptrain/bin/pip install --no-cache-dir --no-deps torch==2.13.0 --index-url "${TORCH_INDEX_URL}"; \
       fi \
    && rm -f wheels/*.whl \
    && cp --remove-destination crds/p2ptrainingjobs.p2ptrain.dev.yaml p2ptrain/crd.yaml \
    && /opt/p2ptrain/bin/pip install --no-cache-dir . \
    && /opt/p2ptrain/bin/pip check \
    && /opt/p2ptrain/bin/python -c 'import sys, torch; assert torch.__version__ == sys.argv[1], torch.__version__' "$expected" \
    && mkdir -p /out \
    && gcc -O3 -fno-math-errno -fPIC -shared -std=c11 -Wall -Wextra -Werror -DP2PTRAIN_CLONES \
        -o /out/p2ptrain_redis.so p2ptrain/csrc/p2ptrain_redis.c -lm

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="p2ptrain" \
      org.opencontainers.image.description="Peer-to-peer, serverless, Byzantine-robust distributed training on Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/p2ptrain/p2ptrain"
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp p2ptrain
COPY --from=build /opt/p2ptrain /opt/p2ptrain
COPY --from=build /out/p2ptrain_redis.so /usr/local/lib/p2ptrain/p2ptrain_redis.so
ENV PATH=/opt/p2ptrain/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    P2PTRAIN_CACHE=/tmp/p2ptrain \
    P2PTRAIN_REDIS_MODULE=/usr/local/lib/p2ptrain/p2ptrain_redis.so
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 9090
ENTRYPOINT ["p2ptrain"]
CMD ["--help"]
