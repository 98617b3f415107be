# fgm-consolidator: runs beside fine-grained-monitor on the same /data volume.
#
# Two stages: the first builds a virtualenv with the package and its dependencies (all
# wheels; no compiler is needed or installed); the second copies only that virtualenv onto a
# clean slim base, so no source tree, pip cache or build layer ends up in the image. Both
# stages use the same base image, because the virtualenv's python links to the base's.

FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY journal ./journal
COPY src ./src
# pyarrow's C++ headers and test suite are not needed to run (about 12 MB).
RUN python -m venv /opt/fgm \
    && /opt/fgm/bin/pip install --no-cache-dir . \
    && rm -rf /opt/fgm/lib/python3.11/site-packages/pyarrow/include \
        /opt/fgm/lib/python3.11/site-packages/pyarrow/tests

FROM python:3.11-slim-bookworm

# A fixed, non-root UID, so volume permissions can be granted to it (fsGroup / chown).
RUN groupadd --gid 10001 fgm \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin fgm

COPY --from=build /opt/fgm /opt/fgm

ENV PATH=/opt/fgm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FGM_DATA_DIR=/data

USER 10001:10001
VOLUME ["/data"]

# No init process: the consolidator is PID 1 and installs its own SIGTERM/SIGINT/SIGHUP
# handlers (a PID 1 receives only signals it handles); it finishes or rolls back the merge in
# progress within --grace-period and exits 0. It starts no child processes, so there is nothing
# to reap.
ENTRYPOINT ["fgm-consolidator"]
CMD ["run"]
