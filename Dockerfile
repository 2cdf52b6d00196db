# aibridgeproxyd container image: the daemon and its CLI (examples/docker-compose.yaml and
# examples/kubernetes/ use it).
#
#   docker build -t aibridgeproxyd .
#   docker run --rm -p 8888:8888 -p 127.0.0.1:8889:8889 aibridgeproxyd
#
# The default command listens on every interface of the container (proxy 8888, admin 8889) with
# the SQLite store in /var/lib/aibridgeproxyd/data; mount a volume there to keep it. Give
# arguments to run something else: `migrate --config FILE`, `tokens create alice`, ...
# Settings come from a config file (--config) or AIBRIDGEPROXYD_<KEY> environment variables.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY aibridgeproxyd ./aibridgeproxyd
COPY addons ./addons
RUN pip install . && rm -rf /src

# A fixed non-root uid, so Kubernetes' runAsNonRoot can check it.
RUN useradd --system --uid 10001 --user-group --create-home \
        --home-dir /var/lib/aibridgeproxyd --shell /usr/sbin/nologin aibridgeproxyd
USER 10001
WORKDIR /var/lib/aibridgeproxyd

# 8888: the proxy listener; 8889: the admin listener (/metrics, /healthz, /readyz, /ca-cert.pem,
# the API and the dashboard).
EXPOSE 8888 8889
ENTRYPOINT ["aibridgeproxyd"]
CMD ["run", "--listen", "0.0.0.0:8888", "--admin-listen", "0.0.0.0:8889"]
