# syntax=docker/dockerfile:1
# The fiqa image: the project installed on the official Ray image whose Ray
# and Python match requirements.lock (ray==2.60.0, Python 3.11). Every pod of
# the k8s/ manifests runs it: Ray head, workers, the job submitter.
#
#   docker build -t fiqa:0.1.0 .                                  # CPU
#   docker build --build-arg RAY_VARIANT=gpu -t fiqa:0.1.0-gpu .  # CUDA
#
# RAY_VARIANT is the platform suffix of the rayproject/ray tag: cpu, gpu, or a
# specific CUDA build such as cu128. For a smaller CPU image, take PyTorch's
# CPU wheels: --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG RAY_VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${RAY_VARIANT}

# Read by pip when given; unset by default.
ARG PIP_EXTRA_INDEX_URL

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The base image's non-root user, ray:users, which owns the Python environment
# in /home/ray/anaconda3 that pip installs into. Numeric, so that Kubernetes
# can verify runAsNonRoot without a runAsUser in the pod spec.
USER 1000:100

# Install from a copy of the sources that is deleted afterwards: a `fiqa/`
# folder in the working directory would shadow the installed package (whose
# fiqa.models, fiqa.pipelines and fiqa.cluster come from other folders).
# Pinned versions: the lock file constrains every dependency; not editable.
COPY --chown=1000:100 . /tmp/fiqa-src
RUN pip install -c /tmp/fiqa-src/requirements.lock /tmp/fiqa-src \
    && rm -rf /tmp/fiqa-src \
    && fiqa --help >/dev/null

WORKDIR /home/ray
CMD ["fiqa", "--help"]
