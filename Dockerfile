# One image for the operator, the peers, the gradient function and the Redis servers.
#   docker build -t p2ptrain:dev .
# Stage 1 builds the wheel and the p2ptrain Redis module; stage 2 is the slim, non-root runtime.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY p2ptrain ./p2ptrain
COPY crds ./crds
COPY operator ./operator
# p2ptrain/crd.yaml is a symlink to crds/ in the source tree: make it a file inside the wheel.
RUN cp --remove-destination crds/p2ptrainingjobs.p2ptrain.dev.yaml p2ptrain/crd.yaml \
    && pip wheel --no-deps --wheel-dir /wheels . \
    && mkdir -p /out \
    && gcc -O3 -fPIC -shared -std=c11 -Wall -Wextra -Werror \
        -o /out/p2ptrain_redis.so p2ptrain/csrc/p2ptrain_redis.c -lm

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="p2ptrain" \
      org.opencontainers.image.description="Peer-to-peer, serverless, Byzantine-robust distributed training on Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/p2ptrain/p2ptrain"
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
# A CPU build of torch, pinned: the default index would pull a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY --from=build /out/p2ptrain_redis.so /usr/local/lib/p2ptrain/p2ptrain_redis.so
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp p2ptrain
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    P2PTRAIN_CACHE=/tmp/p2ptrain \
    P2PTRAIN_REDIS_MODULE=/usr/local/lib/p2ptrain/p2ptrain_redis.so
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 9090
ENTRYPOINT ["p2ptrain"]
CMD ["--help"]
