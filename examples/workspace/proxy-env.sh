# shellcheck shell=sh
# Route a workspace's HTTPS traffic through aibridgeproxyd and trust its CA in every runtime.
#
# Install as /etc/profile.d/aibridgeproxyd.sh (see Dockerfile.snippet), or source it from a
# startup script. It expects, at runtime (never baked into an image):
#   AIBRIDGE_PROXY_TOKEN  the user's proxy token (`aibridgeproxyd tokens create NAME`)
#   AIBRIDGE_PROXY_ADDR   host:port of the proxy listener, e.g. aibridgeproxyd.internal:8888
# and optionally:
#   AIBRIDGE_PROXY_SCHEME http (default) or https when the listener has tls_cert_file set
#   AIBRIDGE_PROXY_CA     the proxy CA file (default: where Dockerfile.snippet installs it)

AIBRIDGE_PROXY_CA="${AIBRIDGE_PROXY_CA:-/usr/local/share/ca-certificates/aibridgeproxyd.crt}"
# Debian/Ubuntu: update-ca-certificates writes the system roots plus the proxy CA here.
# (RHEL/Fedora: /etc/pki/tls/certs/ca-bundle.crt after update-ca-trust.)
_aibridgeproxyd_bundle=/etc/ssl/certs/ca-certificates.crt

if [ -n "${AIBRIDGE_PROXY_TOKEN:-}" ] && [ -n "${AIBRIDGE_PROXY_ADDR:-}" ]; then
    # The token is the Basic password; the user name is ignored. A token never contains
    # characters that need URL-encoding (it is URL-safe base64).
    HTTPS_PROXY="${AIBRIDGE_PROXY_SCHEME:-http}://workspace:${AIBRIDGE_PROXY_TOKEN}@${AIBRIDGE_PROXY_ADDR}"
    https_proxy="$HTTPS_PROXY"
    # Providers are HTTPS only: HTTP_PROXY is not needed. Keep local traffic off the proxy.
    NO_PROXY="${NO_PROXY:-localhost,127.0.0.1,::1}"
    no_proxy="$NO_PROXY"
    export HTTPS_PROXY https_proxy NO_PROXY no_proxy
    # Node's fetch and http modules ignore HTTPS_PROXY unless told otherwise (Node 24+); CLIs
    # such as Claude Code and Copilot CLI read HTTPS_PROXY themselves.
    export NODE_USE_ENV_PROXY=1
fi

if [ -r "$AIBRIDGE_PROXY_CA" ]; then
    # Node ignores the system trust store: NODE_EXTRA_CA_CERTS *adds* the proxy CA to Node's
    # bundled roots, so the proxy CA alone is right here.
    export NODE_EXTRA_CA_CERTS="$AIBRIDGE_PROXY_CA"
    # These *replace* the trust store, so they must name the full system bundle (which includes
    # the proxy CA after update-ca-certificates). Pointing them at the proxy CA alone would break
    # every tunneled HTTPS site, which still presents its real certificate.
    if [ -r "$_aibridgeproxyd_bundle" ]; then
        # OpenSSL-based tools, Python's ssl and httpx (the openai and anthropic SDKs), Go.
        export SSL_CERT_FILE="$_aibridgeproxyd_bundle"
        # Python requests, which otherwise uses certifi's bundle.
        export REQUESTS_CA_BUNDLE="$_aibridgeproxyd_bundle"
        # curl builds that do not read the system bundle by default.
        export CURL_CA_BUNDLE="$_aibridgeproxyd_bundle"
    fi
fi
unset _aibridgeproxyd_bundle
