# syntax=docker/dockerfile:1
# r1nest service image, SGLang variant: the official SGLang image + the AWS EFA
# userspace + r1nest. Build from the repository root (the build context must be the repository):
#   docker build -f images/sglang.Dockerfile -t r1nest:sglang .
# images/README.md says what each layer adds and why.

# The official image, pinned by tag (readable) and by index digest (what is actually pulled).
# It already ships the kernels DeepSeek-R1 needs: sgl-kernel (FlashMLA, CUTLASS FP8 block GEMMs,
# MoE align/top-k), DeepGEMM, DeepEP built against NVSHMEM with GDRCopy and IBGDA, FlashInfer,
# Mooncake for disaggregation, and the RDMA userspace (ibverbs, rdma-core).
FROM lmsysorg/sglang:v0.5.20@sha256:06e4f2ed21afde4ff513cda65070124e727ba23ccaeff7712b8c40e1097d611f

# Bash with pipefail for every RUN below.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# --- layer 1: the kernels are there ---------------------------------------------------------------
# Fails the build, instead of a deployment 20 minutes into loading weights, if a future base tag
# stops shipping one of them. find_spec, not import: the build host has no GPU driver to load.
RUN python3 - <<'PY'
import importlib.util, sys
need = {
    "sglang": "SGLang",
    "sgl_kernel": "sgl-kernel (FlashMLA, FP8 GEMMs, MoE ops)",
    "sglang.srt.layers.moe.fused_moe_triton": "fused MoE",
    "deep_gemm": "DeepGEMM (FP8 block GEMMs)",
    "deep_ep": "DeepEP (expert-parallel all-to-all)",
}
missing = [what for name, what in need.items() if importlib.util.find_spec(name) is None]
if missing:
    sys.exit("base image lacks: " + ", ".join(missing))
PY

# --- layer 2: AWS EFA userspace (libfabric + the aws-ofi-nccl plugin) ----------------------------
# Multi-node R1 on p5/p5en talks NCCL over EFA; the base image has ibverbs but not libfabric
# with the EFA provider nor the aws-ofi-nccl plugin. The host
# provides the kernel module, so --skip-kmod; --skip-limit-conf leaves ulimits to the runtime.
# Set --build-arg WITH_EFA=0 for an image that never runs on AWS.
ARG WITH_EFA=1
ARG EFA_INSTALLER_VERSION=1.47.0
# DL3003: efa_installer.sh must run from its own directory, and the step is conditional, so a
#         WORKDIR cannot replace the `cd`. DL3008: the two helper packages come from the pinned
#         base's Ubuntu archive; their versions differ per release, the installer is pinned.
# hadolint ignore=DL3003,DL3008
RUN if [ "${WITH_EFA}" = "1" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends pciutils environment-modules \
      && curl -fsSL "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" \
         | tar -xz -C /tmp \
      && (cd /tmp/aws-efa-installer && ./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify) \
      && rm -rf /tmp/aws-efa-installer /var/lib/apt/lists/*; \
    fi
ENV PATH="/opt/amazon/efa/bin:${PATH}" \
    FI_PROVIDER=efa \
    FI_EFA_USE_DEVICE_RDMA=1

# --- layer 3: r1nest --------------------------------------------------------------------------------
# The repository itself, installed editable, so templates/ and scripts/ sit beside the package
# (r1nest.paths). Its dependencies are lower bounds the base already satisfies for the most part;
# pip adds only what is missing (pydantic-settings, rich, ...) and boto3 for the DynamoDB ledger.
COPY pyproject.toml README.md /opt/r1nest/
COPY service/ /opt/r1nest/service/
COPY templates/ /opt/r1nest/templates/
COPY scripts/ /opt/r1nest/scripts/
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir -e /opt/r1nest "boto3==1.44.5" \
    && r1nest --version

# --- layer 4: an unprivileged user with its own data and cache directories ------------------------
# UID 10001: clear of the base's users (Ubuntu 24.04 images have uid 1000 "ubuntu").
RUN groupadd --gid 10001 r1nest \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin r1nest \
    && mkdir -p /data/hf /data/r1nest \
    && chown -R r1nest:r1nest /data
ENV HF_HOME=/data/hf \
    R1NEST_DATA_DIR=/data/r1nest \
    R1NEST_ENGINE=sglang
USER 10001:10001
WORKDIR /home/r1nest
VOLUME ["/data"]
EXPOSE 8000

# The gateway answers /health without a key: 200 when the engine is ready, 503 while it warms.
# start-period covers loading the largest model on one node, so warming is not counted a failure.
HEALTHCHECK --interval=30s --timeout=5s --start-period=1800s --retries=3 \
    CMD ["curl", "-fsS", "--max-time", "4", "http://127.0.0.1:8000/health"]

# `r1nest serve` starts the engine with the profile the planner picks for this box, then the
# gateway on :8000. Model and engine come from R1NEST_MODEL / R1NEST_ENGINE or the arguments.
ENTRYPOINT ["r1nest", "serve"]
CMD ["--port", "8000"]
