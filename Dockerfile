# One image for all three services; the command picks the service:
#   python -m services.users | services.threads | services.messages | db up
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY gen ./gen
COPY db ./db
COPY services ./services
# The runtime dependencies only (no dev tools, no embedded PostgreSQL), pinned.
RUN /opt/venv/bin/pip install --no-compile -c constraints.txt . \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin chat
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER chat
CMD ["python", "-m", "services.users"]
