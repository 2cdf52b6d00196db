"""The hook data types of mitmproxy's addon API that live in its ``mitmproxy.proxy`` package.

Addons take them as hook arguments (``server_connect(data: ServerConnectionHookData)``,
``next_layer(nextlayer: NextLayer)``) and read or set their public fields, which is the addon
API; they are imported from here so that nothing outside this package imports
``mitmproxy.proxy``.
"""

from __future__ import annotations

from mitmproxy.proxy.layer import NextLayer
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

__all__ = ["NextLayer", "ServerConnectionHookData"]
