# syntax=docker/dockerfile:1
# The dsipam server image: `docker build -t dsipam .`, then `docker run dsipam` serves
# IpamService on [::]:50051 (set DSIPAM_DATABASE_URL). One image holds every command:
#   dsipam serve | dsipam migrate | dsipam fsck POOL   the server, the migrations, the checker
#   dsipam-cni-install                                 the CNI DaemonSet's node installer
# (its bundle holds the compiled CNI plugin, built in the cni-plugin stage, and the Python one).
# Layout and probes are described in docs/operations.md; tests/e2e/test_deploy.py checks
# this file's structure (base images, non-root USER, entry point, health check).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with dsipam and its dependencies ------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/dsipam/venv
WORKDIR /src
COPY . .
RUN /opt/dsipam/venv/bin/pip install --no-compile . \
 && /opt/dsipam/venv/bin/python -m compileall -q /opt/dsipam/venv/lib \
 && /opt/dsipam/venv/bin/dsipam --help >/dev/null

# ---- cni-plugin: the compiled CNI plugin (clients/cni/go), what nodes run by default ---------
# Built offline from Debian's Go toolchain and its grpc and protobuf packages, as
# scripts/build-cni does; a static binary (no cgo) that runs on any node.
FROM debian:bookworm-slim AS cni-plugin
RUN apt-get update \
 && apt-get install -y --no-install-recommends golang-go golang-google-grpc-dev golang-google-protobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY clients/cni/go clients/cni/go
RUN cd clients/cni/go \
 && GO111MODULE=off GOPATH=/usr/share/gocode CGO_ENABLED=0 go build -trimpath -ldflags=-s -o /out/dsipam-cni . \
 && CNI_COMMAND=VERSION /out/dsipam-cni </dev/null

# ---- cni-bundle: a self-contained runtime that the DaemonSet copies onto each node -------
# Nodes have no Python of the right version, so the plugin travels with its interpreter:
# python/ is a copy of the base image's /usr/local Python without tests, tools and the
# static library; site-packages/ holds what the plugin imports: dsipam.cni (standard library
# only, for its native transport) and, for TLS, which bearer tokens require, grpcio (with
# typing_extensions), protobuf and the dsipam.v1 stubs (tests/e2e/test_deploy.py checks the list).
FROM build AS cni-bundle
RUN set -eux; \
    b=/opt/dsipam/cni-bundle; \
    mkdir -p "$b/python/bin" "$b/python/lib"; \
    cp -L /usr/local/bin/python3.11 "$b/python/bin/python3.11"; \
    cp -a /usr/local/lib/libpython3.11.so* "$b/python/lib/"; \
    cp -a /usr/local/lib/python3.11 "$b/python/lib/python3.11"; \
    cd "$b/python/lib/python3.11"; \
    rm -rf site-packages test idlelib tkinter turtledemo ensurepip lib2to3 pydoc_data config-3.11-*; \
    sp=/opt/dsipam/venv/lib/python3.11/site-packages; \
    mkdir -p "$b/site-packages/dsipam"; \
    cp -a "$sp/grpc" "$sp/google" "$sp/typing_extensions.py" "$b/site-packages/"; \
    cp -a "$sp/dsipam/cni" "$sp/dsipam/v1" "$b/site-packages/dsipam/"; \
    find "$b" -name __pycache__ -prune -exec rm -rf {} +; \
    PYTHONHOME="$b/python" PYTHONPATH="$b/site-packages" LD_LIBRARY_PATH="$b/python/lib" \
        "$b/python/bin/python3.11" -s -c "import grpc, dsipam.v1.ipam_pb2, dsipam.cni"; \
    echo '{"cniVersion":"1.0.0"}' | CNI_COMMAND=VERSION LD_LIBRARY_PATH="$b/python/lib" PYTHONHOME="$b/python" \
        PYTHONPATH="$b/site-packages" "$b/python/bin/python3.11" -s -m dsipam.cni
# bin/dsipam-cni: the compiled plugin, which dsipam-cni-install puts on the node unless
# DSIPAM_CNI_PLUGIN=python asks for the Python plugin above.
COPY --from=cni-plugin /out/dsipam-cni /opt/dsipam/cni-bundle/bin/dsipam-cni

# ---- runtime: the image that runs -------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="dsipam" \
      org.opencontainers.image.description="Dual-stack IPv4/IPv6 address management over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/dsipam/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DSIPAM_LISTEN=[::]:50051 \
    DSIPAM_HEALTH_TARGET=127.0.0.1:50051
RUN groupadd --system --gid 10001 dsipam \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin dsipam
COPY --from=build /opt/dsipam/venv /opt/dsipam/venv
COPY --from=cni-bundle /opt/dsipam/cni-bundle /opt/dsipam/cni-bundle
COPY deploy/docker/healthcheck.py /usr/local/bin/dsipam-healthcheck
COPY deploy/docker/install-cni.sh /usr/local/bin/dsipam-cni-install
COPY deploy/docker/dsipam-cni.sh /opt/dsipam/dsipam-cni.sh
RUN chmod 0755 /usr/local/bin/dsipam-healthcheck /usr/local/bin/dsipam-cni-install
USER 10001:10001
WORKDIR /opt/dsipam
EXPOSE 50051
# grpc.health.v1.Health/Check on the served port (Kubernetes uses its native gRPC probe instead).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 CMD ["dsipam-healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["dsipam"]
CMD ["serve"]
