# The migrator image: the `migrator` command (shim, advance, sync, check, ...) and the ledger
# workload (`python -m migrator.workload`). Used by the lab (docker-compose.yml, docs/lab.md).
#
# No secrets are baked in: passwords reach the container at run time through the variables the
# playbook's password_env fields name. The playbook itself is mounted, not copied.
FROM python:3.11.9-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY migrator ./migrator
RUN pip install . && rm -rf /src

# A non-root user; its state folder is where a named volume mounts (a new named volume takes
# this folder's owner, so the shim and `migrator` commands can write state.json and reports).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/migrator --create-home migrator \
    && mkdir -p /var/lib/migrator/state && chown -R migrator:migrator /var/lib/migrator
USER migrator
WORKDIR /var/lib/migrator

# 6380: the shim's client port; 9121: its admin HTTP (/metrics, /status), as in deploy/lab/migrator.yaml.
EXPOSE 6380 9121

# Healthy while the shim's admin endpoint answers /status. MIGRATOR_HEALTH_URL points it
# elsewhere when shim.admin is not on port 9121. Containers of this image that do not run the
# shim (the workload, one-off commands) disable it (see docker-compose.yml).
ENV MIGRATOR_HEALTH_URL=http://127.0.0.1:9121/status
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['MIGRATOR_HEALTH_URL'], timeout=4).read()"]

ENTRYPOINT ["migrator"]
CMD ["--help"]
