# nbdguard: NBD server for disk images whose formats are pinned, never probed.
FROM python:3.11-slim

RUN useradd --system --uid 10809 --home-dir /var/lib/nbdguard --create-home nbdguard \
    && mkdir -p /etc/nbdguard && chown nbdguard /var/lib/nbdguard

WORKDIR /app
COPY pyproject.toml README.md ./
COPY nbdguard ./nbdguard
RUN pip install --no-cache-dir . && rm -rf /app

VOLUME ["/etc/nbdguard", "/var/lib/nbdguard"]
EXPOSE 10809 9109
USER nbdguard
WORKDIR /var/lib/nbdguard

# /healthz answers 200 only while every export is open and every listener accepts.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9109/healthz', timeout=4).status != 200)"]

ENTRYPOINT ["nbdguard"]
CMD ["serve", "--config", "/etc/nbdguard/nbdguard.toml"]
