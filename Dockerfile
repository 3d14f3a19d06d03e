# nbdguard: NBD server for disk images whose formats are pinned, never probed.
# The config is /etc/nbdguard/nbdguard.toml ($NBDGUARD_CONFIG: config/container.toml unless
# another file is mounted there), the images are under /var/lib/nbdguard (a volume).
FROM python:3.11-slim-bookworm

RUN groupadd --system --gid 10809 nbdguard \
    && useradd --system --uid 10809 --gid 10809 --home-dir /var/lib/nbdguard --create-home \
        --shell /usr/sbin/nologin nbdguard \
    && mkdir -p /etc/nbdguard

WORKDIR /app
COPY pyproject.toml README.md ./
COPY nbdguard ./nbdguard
RUN pip install --no-cache-dir . && rm -rf /app
COPY deploy/docker/entrypoint.sh /usr/local/bin/nbdguard-entrypoint
COPY deploy/docker/healthcheck.py /usr/local/lib/nbdguard/healthcheck.py
# The default config (compose.yaml mounts the same file, so edits need no rebuild).
COPY config/container.toml /etc/nbdguard/nbdguard.toml

ENV NBDGUARD_CONFIG=/etc/nbdguard/nbdguard.toml
VOLUME ["/var/lib/nbdguard"]
EXPOSE 10809 9109
# Any uid works (compose.yaml runs it as the images' owner); the entrypoint checks that this
# one can read the images and says what to do if not.
USER nbdguard
WORKDIR /var/lib/nbdguard

# /healthz on the config's metrics_listen: 200 only while every export is open and every
# listener accepts.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "/usr/local/lib/nbdguard/healthcheck.py"]

# No arguments: serve --config "$NBDGUARD_CONFIG"; others go to nbdguard (check-config, …).
ENTRYPOINT ["nbdguard-entrypoint"]
