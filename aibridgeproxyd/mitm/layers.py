"""Which of our layers take the place of the ones mitmproxy proposes (``next_layer`` hooks).

mitmproxy's own ``next_layer`` addon proposes a layer stack for each connection; the addons
then swap parts of it for ours: the bounded layers on the listener (``client_bounds``), the
extended HTTP layer inside a MITM'd tunnel (``http_layer``), a raw relay for every other
tunnel. A proposed layer has already put itself on its context's layer stack when it was
constructed, so replacing one means taking it off that stack again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.context import Context

from aibridgeproxyd.mitm.client_bounds import (
    BoundedClientTLSLayer,
    BoundedHttpLayer,
    outer_http_layer,
)
from aibridgeproxyd.mitm.http_layer import AIBridgeHttpLayer
from aibridgeproxyd.mitm.splice_relay import SplicePipes
from aibridgeproxyd.mitm.stream_bounds import DEFAULT_BOUNDS, StreamBounds
from aibridgeproxyd.mitm.tunnel_relay import FastTunnelLayer


def bound_client_layers(
    nextlayer: layer.NextLayer, stream_bounds: StreamBounds = DEFAULT_BOUNDS
) -> None:
    """Bound the heads and bodies read on the listener itself (CONNECT, absolute-form requests)
    and every TLS ClientHello: each proposed ``HttpLayer`` of the listener and each
    ``ClientTLSLayer``, at whatever depth of the proposed stack, is swapped for its bounded
    class before it starts. Every bounded HTTP layer of the listener (this one, or one an
    addon before put there) holds its requests' upstreams to ``stream_bounds``."""
    parent: layer.Layer | None = None
    current: layer.Layer | None = nextlayer.layer
    while current is not None:  # e.g. ClientTLSLayer, then HttpLayer on a TLS listener
        replacement: layer.Layer | None = None
        if type(current) is layers.HttpLayer and outer_http_layer(current.mode):
            replacement = _swap(current, functools.partial(BoundedHttpLayer, mode=current.mode))
        elif type(current) is layers.ClientTLSLayer:
            replacement = _swap(current, BoundedClientTLSLayer)
        if replacement is not None:
            if parent is None:
                nextlayer.layer = replacement
            else:
                parent.child_layer = replacement  # type: ignore[attr-defined]
            current = replacement
        if isinstance(current, BoundedHttpLayer) and outer_http_layer(current.mode):
            current.stream_bounds = stream_bounds
        parent, current = current, getattr(current, "child_layer", None)


def tunnel_http_layer(nextlayer: layer.NextLayer) -> BoundedHttpLayer | None:
    """The bounded HTTP layer proposed for the requests inside a MITM'd tunnel, or None. Its
    ``error_format`` is the client format its own refusals (431) use."""
    proposed = nextlayer.layer
    if isinstance(proposed, BoundedHttpLayer) and not outer_http_layer(proposed.mode):
        return proposed
    return None


def install_mitm_http_layer(
    nextlayer: layer.NextLayer, stream_bounds: StreamBounds, connect_id: str
) -> AIBridgeHttpLayer | None:
    """Put our HTTP layer (``AIBridgeHttpLayer``) in place of the ``HttpLayer`` mitmproxy
    proposes inside a MITM'd tunnel, once its TLS is set up; return it, or None when the
    proposal is not an HTTP layer (the TLS layer before it)."""
    proposed = nextlayer.layer
    if type(proposed) is not layers.HttpLayer:
        return None
    http_layer = AIBridgeHttpLayer(_detached(nextlayer), proposed.mode)
    http_layer.stream_bounds = stream_bounds
    http_layer.connect_id = connect_id
    nextlayer.layer = http_layer
    return http_layer


def skip_server_tls(nextlayer: layer.NextLayer) -> None:
    """Take the ``ServerTLSLayer`` mitmproxy proposes above the client's TLS of a MITM'd tunnel
    off the stack. It would hold the TLS of the CONNECT's own server connection, which is never
    dialled for a MITM'd host (the intercept addon answers the CONNECT and sets
    ``establish_server_tls_first`` False); every upstream connection the HTTP layer opens gets
    a TLS layer of its own. Left in place, it passes every event and command of the client's
    connection through one more layer."""
    proposed = nextlayer.layer
    child = getattr(proposed, "child_layer", None)
    if type(proposed) is layers.ServerTLSLayer and isinstance(child, layers.ClientTLSLayer):
        if proposed in nextlayer.context.layers:
            nextlayer.context.layers.remove(proposed)
        nextlayer.layer = child


def install_tunnel_relay(
    nextlayer: layer.NextLayer,
    on_handover: Callable[[str], None] | None = None,
    pipes: SplicePipes | None = None,
) -> None:
    """Relay the tunnel byte for byte, whatever it carries (mitmproxy would look into it), on
    the fast path once it can (``tunnel_relay``; ``on_handover`` is called then with the relay
    used, ``"splice"`` or ``"copy"``; splice needs ``pipes``)."""
    nextlayer.layer = FastTunnelLayer(_detached(nextlayer), on_handover, pipes)


def _detached(nextlayer: layer.NextLayer) -> Context:
    """The context with the layers mitmproxy proposed taken off its stack again."""
    proposed = nextlayer.layer
    while proposed is not None:
        if proposed in nextlayer.context.layers:
            nextlayer.context.layers.remove(proposed)
        proposed = getattr(proposed, "child_layer", None)
    return nextlayer.context


def _swap(proposed: layer.Layer, make: Callable[[Context], layer.Layer]) -> layer.Layer:
    """A bounded layer in place of a proposed one that has not started yet: same context, same
    place in the context's layer stack, same child."""
    context = proposed.context
    index = context.layers.index(proposed)
    # Constructing a layer appends it to the context's stack: take the proposal off first.
    context.layers.remove(proposed)
    replacement = make(context)
    context.layers.remove(replacement)
    context.layers.insert(index, replacement)
    child = getattr(proposed, "child_layer", None)
    if child is not None:
        replacement.child_layer = child  # type: ignore[attr-defined]
    return replacement


__all__ = [
    "bound_client_layers",
    "install_mitm_http_layer",
    "install_tunnel_relay",
    "skip_server_tls",
    "tunnel_http_layer",
]
