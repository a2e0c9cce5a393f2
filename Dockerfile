# ms3seg-app BIDS App image.
#   docker build -t ms3seg .                                    # CUDA base, GPU TensorFlow, FSL
#   docker build --build-arg WITH_FSL=0 --build-arg PIP_EXTRAS= -t ms3seg:cpu .
# Runs read-only and as non-root: everything writable lives under /tmp (bind or tmpfs).
ARG BASE_IMAGE=nvidia/cuda:12.5.1-base-ubuntu22.04

# ---------------------------------------------------------------- build stage
FROM ${BASE_IMAGE} AS build
ARG PIP_EXTRAS=gpu
ARG WITH_FSL=1
# Build-time only, empty by default (pip reads them from the environment): a CA bundle for
# networks that inspect TLS, and a folder of local wheels, both bind-mounted into the build,
# e.g. buildah bud -v /etc/ssl/certs:/host-certs:ro --build-arg PIP_CERT=/host-certs/ca-certificates.crt
#                  -v /opt/wheels:/wheels:ro --build-arg PIP_FIND_LINKS=/wheels
ARG PIP_CERT=
ARG PIP_FIND_LINKS=
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Distribution versions are not pinned: the same file builds on Ubuntu (CUDA) and Debian bases.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates curl bzip2 \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md LICENSE /src/
COPY ms3seg_app /src/ms3seg_app
# One dependency list: pyproject.toml (extras: gpu = tensorflow[and-cuda]).
# hadolint ignore=DL3013
RUN pip install --upgrade pip \
 && if [ -n "${PIP_EXTRAS}" ]; then pip install "/src[${PIP_EXTRAS}]"; else pip install /src; fi
# FSL's bet and flirt from FSL's own conda channel. FSL is free for non-commercial use only:
# see https://fsl.fmrib.ox.ac.uk/fsl/docs/#/license before building with WITH_FSL=1.
RUN if [ "${WITH_FSL}" = "1" ]; then \
      curl -fsSL https://micro.mamba.pm/api/micromamba/linux-64/latest | tar -xj -C /usr/local bin/micromamba \
      && /usr/local/bin/micromamba create -y -p /opt/fsl \
           -c https://fsl.fmrib.ox.ac.uk/fsldownloads/fslconda/public/ -c conda-forge fsl-bet2 fsl-flirt \
      && /usr/local/bin/micromamba clean -a -y; \
    else mkdir -p /opt/fsl/bin; fi

# ---------------------------------------------------------------- runtime stage
FROM ${BASE_IMAGE}
ARG WITH_FSL=1
LABEL org.opencontainers.image.title="ms3seg-app" \
      org.opencontainers.image.description="BIDS App: MS3SEG tri-mask (ventricles, normal WMH, MS lesions) from FLAIR" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="https://github.com/ms3seg/ms3seg-app" \
      org.opencontainers.image.version="0.3.0"
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 1000 --create-home --home-dir /home/ms3seg ms3seg
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/fsl /opt/fsl
# Writable places for a read-only image (docker --read-only --tmpfs /tmp, Singularity):
# HOME and every cache point into /tmp; nothing is fetched at run time.
ENV PATH=/opt/venv/bin:/opt/fsl/bin:$PATH \
    FSLDIR=/opt/fsl FSLOUTPUTTYPE=NIFTI_GZ \
    HOME=/tmp MPLCONFIGDIR=/tmp/mpl XDG_CACHE_HOME=/tmp/cache KERAS_HOME=/tmp/keras \
    DENO_DIR=/tmp/deno TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1 \
    NIPYPE_NO_ET=1 NO_ET=1 TF_CPP_MIN_LOG_LEVEL=2 MS3SEG_CONTAINER=docker
# Check the installation; then empty /tmp, whose content podman/docker copy into a --tmpfs
# /tmp (a root-owned /tmp/mpl left here would be unwritable for the runtime user).
RUN ms3seg --version && find /tmp -mindepth 1 -delete
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["ms3seg"]
