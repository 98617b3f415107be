# fgm-consolidator: runs beside fine-grained-monitor on the same /data volume.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, non-root UID, so volume permissions can be granted to it (fsGroup / chown).
RUN groupadd --gid 10001 fgm && useradd --uid 10001 --gid 10001 --no-create-home fgm

WORKDIR /app
COPY pyproject.toml README.md ./
COPY journal ./journal
COPY src ./src
RUN pip install --no-cache-dir . && rm -rf /app/src /app/journal

USER 10001:10001
VOLUME ["/data"]
ENV FGM_DATA_DIR=/data

# Python is PID 1 and handles SIGTERM itself: it finishes or rolls back the merge in
# progress within --grace-period and exits 0.
ENTRYPOINT ["fgm-consolidator"]
CMD ["run"]
