"""The mitmproxy source ``aibridgeproxyd.mitm`` was written against, pinned method by method.

Every class in ``aibridgeproxyd.mitm`` that extends a mitmproxy, wsproto or h2 class is walked:
each method it defines that overrides one of theirs must have a pinned digest (sha256 of
``inspect.getsource``) in ``PINNED``. Methods and functions we copied, or whose internal
behaviour we rely on without overriding them, are listed in ``COPIED``, and pinned the same way.
A mitmproxy upgrade that changes one of them fails here with its qualified name and the
modules of ours to re-check. Once they are re-checked (and fixed), print the new pins with
``python -m tests.unit.test_mitm_digests`` and replace ``PINNED``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import types
from collections.abc import Iterator
from typing import Any

import pytest

import aibridgeproxyd.mitm

# Packages whose internals the mitm package builds on.
THIRD_PARTY = ("mitmproxy", "wsproto", "h2")

# Copied or relied upon without an override: mitmproxy's qualified name -> (the module of ours
# to re-check, what depends on it).
COPIED: dict[str, tuple[str, str]] = {
    "mitmproxy.addonmanager.AddonManager._iter_hooks": (
        "aibridgeproxyd.mitm.dispatch",
        "_handlers copies which attributes count as an addon's handler",
    ),
    "mitmproxy.addonmanager.AddonManager.invoke_addon": (
        "aibridgeproxyd.mitm.dispatch",
        "HookDispatch.trigger_event calls each handler as it does (awaits an awaitable)",
    ),
    "mitmproxy.addonmanager.safecall": (
        "aibridgeproxyd.mitm.dispatch",
        "HookDispatch.trigger_event answers a handler's exception as it does",
    ),
    "mitmproxy.proxy.layers.http.HttpStream.handle_connect_finish": (
        "aibridgeproxyd.mitm.upstream_proxy, aibridgeproxyd.mitm.responses",
        "_ChainedStream._tunnel_open copies its 2xx branch; connection_established its 200",
    ),
    "mitmproxy.proxy.layers.http._http1.Http1Client.send": (
        "aibridgeproxyd.mitm.http_layer",
        "as_http1 copies its HTTP/2 to HTTP/1.1 request conversion",
    ),
    "mitmproxy.proxy.layers.http._upstream_proxy.HttpUpstreamProxy.make": (
        "aibridgeproxyd.mitm.upstream_proxy",
        "_ChainedStream builds the tunnel stack mitmproxy's upstream mode builds",
    ),
    "mitmproxy.proxy.layers.http._upstream_proxy.HttpUpstreamProxy.start_handshake": (
        "aibridgeproxyd.mitm.upstream_proxy",
        "_ChainedHttpLayer.get_connection turns send_connect off before it runs",
    ),
    "mitmproxy.proxy.layers.http.HttpStream.state_stream_response_body": (
        "aibridgeproxyd.mitm.http_layer",
        "AIBridgeHttpStream._stream_chunk copies its ResponseData branch",
    ),
    "mitmproxy.proxy.layers.http._http1.Http1Server.send": (
        "aibridgeproxyd.mitm.framing",
        "FramingHttp1Server._send_chunk copies its ResponseData branch",
    ),
    "mitmproxy.proxy.tunnel.TunnelLayer.__init__": (
        "aibridgeproxyd.mitm.http_layer",
        "_dialled finds the connection a corporate proxy's tunnel dials in tunnel_connection",
    ),
    "mitmproxy.proxy.layers.http._http_h2.BufferedH2Connection.send_data": (
        "aibridgeproxyd.mitm.memory_budget, aibridgeproxyd.mitm.http_layer",
        "unsent_bytes and unread_response_streams read the stream_buffers it fills",
    ),
    "mitmproxy.proxy.layers.websocket.WebsocketLayer.start": (
        "aibridgeproxyd.mitm.stream_bounds",
        "limit_websocket_messages switches the class of the connections it creates",
    ),
    "mitmproxy.proxy.layer.Layer.__init__": (
        "aibridgeproxyd.mitm.layers",
        "_swap and _detached undo its append to the context's layer stack",
    ),
    "mitmproxy.proxy.server.ConnectionHandler.__init__": (
        "aibridgeproxyd.mitm.connections",
        "ClientConnection reads transports and timeout_watchdog and replaces max_conns",
    ),
    "mitmproxy.proxy.server.ConnectionHandler.open_connection": (
        "aibridgeproxyd.mitm.connections, aibridgeproxyd.mitm.http_layer",
        "forget_transport removes the record a cancelled dial leaves; the killed-before-"
        "connect text RefusedDial carries",
    ),
    "mitmproxy.proxy.server.ConnectionHandler.handle_connection": (
        "aibridgeproxyd.mitm.connections, aibridgeproxyd.mitm.tunnel_relay",
        "ClientConnection.close_leftover_socket closes the socket it can leave open; "
        "FastTunnelLayer hands over once both its reader loops wait in reader.read(); it "
        "looks drain_writers up on the handler (ClientConnection.drain_only_when_buffered)",
    ),
    "mitmproxy.proxy.server.ConnectionHandler.drain_writers": (
        "aibridgeproxyd.mitm.tunnel_relay, aibridgeproxyd.mitm.connections",
        "_Relay passes pause_writing/resume_writing on, so the writer.drain() it awaits ends; "
        "drain_when_buffered skips it when it would wait for nothing",
    ),
    "mitmproxy.proxy.mode_servers.AsyncioServerInstance.listen": (
        "aibridgeproxyd.mitm.listen_socket",
        "ListenSocket replaces it per instance: the same servers, on a socket bound already",
    ),
    "mitmproxy.addons.proxyserver.Servers.update": (
        "aibridgeproxyd.mitm.listen_socket",
        "ListenSocket relies on changed being sent before the new instances start",
    ),
    "mitmproxy.proxy.layer.NextLayer._ask": (
        "aibridgeproxyd.mitm.tunnel_relay",
        "FastTunnelLayer's handover check runs after the events it replays synchronously",
    ),
    "mitmproxy.proxy.layers.tcp.TCPLayer.relay_messages": (
        "aibridgeproxyd.mitm.tunnel_relay",
        "FastTunnelLayer relays with it before the handover and closes the tunnel with it after",
    ),
    "mitmproxy.proxy.server.ConnectionHandler.close_connection": (
        "aibridgeproxyd.mitm.connections, aibridgeproxyd.mitm.tunnel_relay",
        "ClientConnection.close and close_upstream; FastTunnelLayer half-closes with it",
    ),
    "mitmproxy.proxy.layers.http.HttpStream.passthrough": (
        "aibridgeproxyd.mitm.tunnel_relay",
        "FastTunnelLayer half-closes itself: passthrough makes a tunnel's half-close a close",
    ),
    "mitmproxy.proxy.server.TimeoutWatchdog.register_activity": (
        "aibridgeproxyd.mitm.connections",
        "ClientConnection.last_activity reads the time it records",
    ),
    "mitmproxy.addons.tlsconfig.TlsConfig.tls_start_server": (
        "aibridgeproxyd.mitm.tls",
        "proxy_tls_connection copies its certificate name check",
    ),
    "mitmproxy.certs.CertStore.expire": (
        "aibridgeproxyd.mitm.leaf_certs",
        "evict_expiring removes leaves from certs and expire_queue as it does",
    ),
    "mitmproxy.net.http.validate.validate_headers": (
        "aibridgeproxyd.mitm.framing",
        "request_framing_error decides framing before mitmproxy's check would",
    ),
    "mitmproxy.net.http.http1.read.expected_http_body_size": (
        "aibridgeproxyd.mitm.framing",
        "request_body_size relies on it once the framing is unambiguous",
    ),
    "mitmproxy.proxy.layers.http._http1.Http1Client.read_headers": (
        "aibridgeproxyd.mitm.body_chunks",
        "coalesce_chunks wraps the body_reader it sets once the state is read_body",
    ),
    "mitmproxy.proxy.layers.http._http1.make_body_reader": (
        "aibridgeproxyd.mitm.body_chunks",
        "the reader it makes for a body without a length is the one coalesce_chunks wraps",
    ),
    "mitmproxy.proxy.layers.http._http1.Http1Connection.read_body": (
        "aibridgeproxyd.mitm.body_chunks",
        "CoalescingChunkedReader answers its calls: Data, EndOfMessage, None, ProtocolError",
    ),
    "mitmproxy.proxy.layers.http.HttpClient._handle_event": (
        "aibridgeproxyd.mitm.body_chunks",
        "coalesce_chunks finds the HTTP/1 client as its child_layer",
    ),
    "mitmproxy.proxy.layers.http._http1.Http1Connection.start": (
        "aibridgeproxyd.mitm.body_chunks",
        "binds state to read_headers before coalesce_chunks changes the class: it rebinds it",
    ),
    "mitmproxy.proxy.layers.http._http1.Http1Connection.mark_done": (
        "aibridgeproxyd.mitm.body_chunks",
        "sets state to self.read_headers for the next answer, so the override reads it",
    ),
    "h11._receivebuffer.ReceiveBuffer.__init__": (
        "aibridgeproxyd.mitm.body_chunks",
        "_pass_over_informational reads the first bytes of _data, the bytearray it sets",
    ),
    "h11._receivebuffer.ReceiveBuffer.__len__": (
        "aibridgeproxyd.mitm.body_chunks",
        "CoalescingChunkedReader measures _data, what __len__ and __bool__ measure, without them",
    ),
    "h11._receivebuffer.ReceiveBuffer.__bool__": (
        "aibridgeproxyd.mitm.body_chunks",
        "CoalescingChunkedReader tests _data for emptiness, as __bool__ does through __len__",
    ),
    "h11._receivebuffer.ReceiveBuffer.maybe_extract_lines": (
        "aibridgeproxyd.mitm.body_chunks",
        "passes over a whole 1xx head, searching only the bytes not searched before",
    ),
    "mitmproxy.proxy.layers.http._http1.Http1Connection.done": (
        "aibridgeproxyd.mitm.body_chunks",
        "the state an answer broken off by too many 1xx heads ends in: it reads nothing",
    ),
}

# sha256 of inspect.getsource of each method or function, as reviewed for mitmproxy 12.3.1.
PINNED: dict[str, str] = {
    "h11._receivebuffer.ReceiveBuffer.__bool__": "85d41e719e353685d92d73359c641835d3486fc73c735a1c69ba78011c91b8ee",
    "h11._receivebuffer.ReceiveBuffer.__init__": "e12e530df7b8d32a667ad84dfaaae5e48dcc1fd8d5bc855369a87ed2d8b95f35",
    "h11._receivebuffer.ReceiveBuffer.__len__": "8974c008b1fbdc4dae84de8ffe473620861188fa7466a7bdd3b9a9df50658995",
    "h11._receivebuffer.ReceiveBuffer.maybe_extract_lines": "435e54e6db463e3195959055e6d7c544e29f1afe3daaa3785e3208ceb3401052",
    "mitmproxy.addonmanager.AddonManager.__init__": "5e4ff02a74f2c6e795ebb7190960e31f6a4f5475d6c28f3d3bf2a5b3b07dec12",
    "mitmproxy.addonmanager.AddonManager._iter_hooks": "350b419ab7284091f6341cbeb463bf6071dca027396ab37d0615789def57e7c0",
    "mitmproxy.addonmanager.AddonManager.handle_lifecycle": "38c97e792d1db5b7cb8a6b71ff30fe882160e56e9e701fa8b035c64deeea7a5a",
    "mitmproxy.addonmanager.AddonManager.invoke_addon": "13180532440359de4072c45e3f24aa3ad3b75292ef1ebfa5caa6385160a0be12",
    "mitmproxy.addonmanager.AddonManager.trigger_event": "b763c59bc4992e33030d38fe5a62368b0437ad4f327ea609b0664db32286a4d9",
    "mitmproxy.addonmanager.safecall": "f2052c18340e99b029865b6c9aae1ae3d5e61e203bbb702e11deb059da7660f1",
    "mitmproxy.addons.proxyserver.Servers.update": "e653c1bdfa8cf352639a630a861875d3db842bf52f315c7d0b131fdf9102647f",
    "mitmproxy.addons.tlsconfig.TlsConfig.tls_start_server": "2e2dc9c25670cf646b0473ac4dd043dfb06b1ee2a1f58879e484d112acc0a55a",
    "mitmproxy.certs.CertStore.expire": "a9f77838cdc77139b587d942dda9e9ae22306aeb693b44cf45b03552b28201a3",
    "mitmproxy.net.http.http1.read.expected_http_body_size": "bf258f07286cf770c6fa0b4c3e4b14588f90937a853c771f1aa42b7662c73294",
    "mitmproxy.net.http.validate.validate_headers": "e7647a94704363e70ef4ebf60dd52e0001ed73c088df683fd0227eea2ab123e3",
    "mitmproxy.proxy.commands.RequestWakeup.__init__": "c9b12d5ed9749ee5c81f668bf9108959a86e906d46d535a5dfffe59779c6e307",
    "mitmproxy.proxy.layer.Layer.__init__": "fd5121f4df9d0eba6f69c84a90b841eea79572404b5f6c26f91074aaf81bb1dd",
    "mitmproxy.proxy.layer.Layer.handle_event": "fd88b0fb09ceddbb1915fe0d588c206e8310d6883a77048a665675e49e43de2b",
    "mitmproxy.proxy.layer.NextLayer._ask": "4d8ace76d8488336145c8cd65dd7484051500e20e021dfd7abe2aa16d7b5ea6c",
    "mitmproxy.proxy.layers.http.HttpClient._handle_event": "bc1cae775a49a4fed59b10fa41d17cb198678db24a26ba5373d4ab275df4628f",
    "mitmproxy.proxy.layers.http.HttpLayer.__init__": "1ece202e595d103e3feac18972205244659a0ed41e5462450bfb0688422dbfb4",
    "mitmproxy.proxy.layers.http.HttpLayer._handle_event": "6ba31883cc7a06b3c6e0c69dc231ae54618e6a9a7e543ec5ea43e1b698da31c7",
    "mitmproxy.proxy.layers.http.HttpLayer.event_to_child": "1095f6e1581d1780afd5e87446b11eee0b12fb196c9be559f0fe15055436c8d7",
    "mitmproxy.proxy.layers.http.HttpLayer.get_connection": "1aa1c63e3175766c1a2340e2b763423ce54d7baa62f7febb7ec912deec80d93a",
    "mitmproxy.proxy.layers.http.HttpLayer.make_stream": "654959c6e74548e14d3e0419c3c7bb06b0d36d377da74444668883e42241b06d",
    "mitmproxy.proxy.layers.http.HttpLayer.register_connection": "deed6282affc431f64a88b4b6bf181c69fba41d60125438f0d8c3ef954b73786",
    "mitmproxy.proxy.layers.http.HttpStream.__init__": "9892a5f6b47b7b7b53c9d441b1e80241f7264f354166a0119ca2ae4640b31a0a",
    "mitmproxy.proxy.layers.http.HttpStream._handle_event": "e3cbfef7310ae81ffa7ed7ecba57f932afabada8cd48921308db363c47dd6c89",
    "mitmproxy.proxy.layers.http.HttpStream.flow_done": "ad9969744785c572bf38b70c9269469554e6fcf016ea7d7f89541b865cff6d85",
    "mitmproxy.proxy.layers.http.HttpStream.handle_connect_finish": "eb3a0054cb5b716e5e015589ebc8593956839fe8a15ec388c822951a5b5a90e0",
    "mitmproxy.proxy.layers.http.HttpStream.handle_connect_regular": "ae920a52067801dc6f3e0f1e4685c09649e7e58957f585918bc58f062c439388",
    "mitmproxy.proxy.layers.http.HttpStream.handle_protocol_error": "59fc3b2eeeabf63a64d4cce98b4fe4cab5193ebefbd9c32ae186e65c7d25bfe2",
    "mitmproxy.proxy.layers.http.HttpStream.make_server_connection": "ddc7bc72f4d2fbc7d7be17c31ab321035c8e50672160a6fd3b84aec24e7350fb",
    "mitmproxy.proxy.layers.http.HttpStream.passthrough": "a6df32aba1ae251a3857c0ea097d8315c6c5871a7704cb4cbb8314f4ea700f36",
    "mitmproxy.proxy.layers.http.HttpStream.send_response": "d581bc106152e3697ccdcad192fe60bac6f6bea84f86a40d94d62bb38b351fa4",
    "mitmproxy.proxy.layers.http.HttpStream.state_consume_request_body": "45459c1bbd8bdb1ac31251376aea71cfa58cb5dbd3a603d4e4e22b2891e663d7",
    "mitmproxy.proxy.layers.http.HttpStream.state_stream_response_body": "3fb6320300d3ddd5569cfe3c04720b339cd64e400956b7d55b5d31fdcaf22e49",
    "mitmproxy.proxy.layers.http.HttpStream.state_wait_for_response_headers": "10e32e91b294816432efae8d1f68c784ce36fc94f0f8202516be2c7f136707dd",
    "mitmproxy.proxy.layers.http._http1.Http1Client.read_headers": "415454c5fa8b598177bdf456581a30f54c4af591bc3c3dd68ea774b5cd178977",
    "mitmproxy.proxy.layers.http._http1.Http1Client.send": "35d961e20d4812046b21ccbb4e616b38f2898780b32363b943a0b31fa499f871",
    "mitmproxy.proxy.layers.http._http1.Http1Connection._handle_event": "2ac8db3e43ae743fd21f78709327091ff712e8c0addf4466f1f1f972c24750d2",
    "mitmproxy.proxy.layers.http._http1.Http1Connection.done": "7c8d996749eb1500a4524b8c0210148edd33320694a31ef0cdbbc724713ead40",
    "mitmproxy.proxy.layers.http._http1.Http1Connection.mark_done": "dc5ed395ce4f07634f7a4dcd710d8130d0c036c1a03cbccd74fb69783c6f8787",
    "mitmproxy.proxy.layers.http._http1.Http1Connection.read_body": "aece271029af36e4b7eaf84aa17ddcf4ee0efb35e7f04c842c2a7333804a71f1",
    "mitmproxy.proxy.layers.http._http1.Http1Connection.start": "888ce41383823cf2267a2b264680e041cb0f800eda5324e4c7c547dcadf5108d",
    "mitmproxy.proxy.layers.http._http1.Http1Server.__init__": "508efbb58d5dead1e2d2dd4452463db2a3ac54777411cd9e3396b868b81acacb",
    "mitmproxy.proxy.layers.http._http1.Http1Server.read_headers": "3fe0945216bcf7bc505e296e44dd33908b19aa900d4157e977499bf7164027d6",
    "mitmproxy.proxy.layers.http._http1.Http1Server.send": "cc218a1337c0f5cfba087b270eab789eea877c9a5201eaf22f2b8927efcce85c",
    "mitmproxy.proxy.layers.http._http1.make_body_reader": "9b076acda459637bde527694ba13bd723cb29ced1bb08e2673b9e4c64eca2471",
    "mitmproxy.proxy.layers.http._http2.Http2Server.__init__": "fbaceff7e0dfcd9e00e4de54d4955eabc7ed9c146602e583ffa32d19c2f7c164",
    "mitmproxy.proxy.layers.http._http2.Http2Server._handle_event": "7282fa18e70a3eaac6f66a4b06dccafa34576a5bfe79feae6b2b212b42165b3c",
    "mitmproxy.proxy.layers.http._http2.Http2Server.handle_h2_event": "d24a023c678de6ced81275c0ebf2aba54d976e5326965d8c0e952b4cd4f5fb76",
    "mitmproxy.proxy.layers.http._http_h2.BufferedH2Connection.send_data": "eeb7918d96b197086bd4dae11737a48f4869e96dab114c6244b96ad96f3d52de",
    "mitmproxy.proxy.layers.http._upstream_proxy.HttpUpstreamProxy.make": "900a55dd107bd57648e5d09b39505bb04c3e302f186c0d347ac433dabdf05db9",
    "mitmproxy.proxy.layers.http._upstream_proxy.HttpUpstreamProxy.receive_handshake_data": "43231e9847e9f1c6e0c3f961ad543d0bbdf4215c3a43cb95c8327ae7561d6fb6",
    "mitmproxy.proxy.layers.http._upstream_proxy.HttpUpstreamProxy.start_handshake": "87539fca2884afab7177b25d89972cdf1c9e199f5de584ac73282e0c4d0f029f",
    "mitmproxy.proxy.layers.tcp.TCPLayer.__init__": "1aa7d03a0e4a1b053fc0031b153917a006805b17179607f2553ad0479e708a6b",
    "mitmproxy.proxy.layers.tcp.TCPLayer._handle_event": "b1418418362ceaa7855fbffc7050b9cb0fe222a42756e5822aaf601ce02c471e",
    "mitmproxy.proxy.layers.tcp.TCPLayer.relay_messages": "3b3d49a9f63b7d4097fe86a26ee72020605693116c3a6a2874c62ed2422ce660",
    "mitmproxy.proxy.layers.tcp.TCPLayer.start": "b1418418362ceaa7855fbffc7050b9cb0fe222a42756e5822aaf601ce02c471e",
    "mitmproxy.proxy.layers.tls.ClientTLSLayer.receive_handshake_data": "a0ee021f92f6d0ff887b1bf9cea7fe70c63f2625bc0d1f148948809736fcc3cb",
    "mitmproxy.proxy.layers.websocket.WebsocketLayer.start": "8445ad1cfb2fcca53cc3a46055ad18991df716809891b60737740e38e977ba28",
    "mitmproxy.proxy.mode_servers.AsyncioServerInstance.listen": "7670a9038b44170dfa2c831bb3d8d4e0a91add8e54e31f3365bfa16b0cf80527",
    "mitmproxy.proxy.server.ConnectionHandler.__init__": "ffb8e6c9e6c6d0207ce1b32773e84eef70922ac7c33d311c07092862e05162d4",
    "mitmproxy.proxy.server.ConnectionHandler.close_connection": "c0d10cc05dd65b80025d49f02f3ad4315fbd3ed8b82778eba7c55e29155f8cb6",
    "mitmproxy.proxy.server.ConnectionHandler.drain_writers": "6b57434604561e3e9b58146e7e4fb0d12199906ca8a5bcc4e1a0d1ee3b85c410",
    "mitmproxy.proxy.server.ConnectionHandler.handle_connection": "95c3f93e9824e527cd3c1af9656c0e04690562abcd23f0b029d547257fb53f94",
    "mitmproxy.proxy.server.ConnectionHandler.open_connection": "5e0b3cbaf7a4030a0a044c9ca36296c2c53a874e47cd861e5d7f70a88beff951",
    "mitmproxy.proxy.server.TimeoutWatchdog.register_activity": "41e033f7debf79d31cb81365348cb9aef23a85e7beb9341d38745b73e3cbd4ec",
    "mitmproxy.proxy.tunnel.TunnelLayer.__init__": "f1db39b66512ba695e130dfde982c4b2ed294fd42d2790001c0659e33fe440ec",
    "wsproto.connection.Connection.events": "e4d77be0bfef1af244f2ea432158259d022a621df8da5282012b1664493c2047",
    "wsproto.extensions.PerMessageDeflate.frame_inbound_header": "5451a091b37fe47d702af40a4edece015f6625b86f09e3a2924b9ecdeeaed136",
    "wsproto.extensions.PerMessageDeflate.frame_inbound_payload_data": "93bc8692346aa787e24a9d3ac672f91163d945a19c7a0b1cf048959d89a23fe5",
}


def _third_party(cls: type) -> bool:
    return cls.__module__.split(".")[0] in THIRD_PARTY


def _functions(attribute: Any) -> list[types.FunctionType]:
    """The functions behind a class attribute (a property has up to three), else []."""
    if isinstance(attribute, staticmethod | classmethod):
        attribute = attribute.__func__
    if isinstance(attribute, property):
        return [f for f in (attribute.fget, attribute.fset, attribute.fdel) if f is not None]  # type: ignore[misc]
    return [attribute] if isinstance(attribute, types.FunctionType) else []


def _our_classes() -> Iterator[type]:
    """Every class defined in a module of aibridgeproxyd.mitm."""
    package = aibridgeproxyd.mitm
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if inspect.isclass(value) and value.__module__ == module.__name__:
                yield value


def overrides() -> dict[str, list[str]]:
    """mitmproxy's qualified method name -> the methods of ours that override it (directly, or
    through another class of ours). Methods a decorator generated (dataclass) are not ours."""
    found: dict[str, list[str]] = {}
    for cls in _our_classes():
        module_file = inspect.getsourcefile(cls)
        for name, attribute in vars(cls).items():
            ours = [inspect.unwrap(f) for f in _functions(attribute)]
            if not ours or any(inspect.getsourcefile(f) != module_file for f in ours):
                continue
            base = next((b for b in cls.__mro__[1:] if _third_party(b) and name in vars(b)), None)
            if base is None or not _functions(vars(base)[name]):
                continue
            theirs = f"{base.__module__}.{base.__qualname__}.{name}"
            found.setdefault(theirs, []).append(f"{cls.__module__}.{cls.__qualname__}.{name}")
    return found


def resolve(qualified_name: str) -> Any:
    """The function, method or property named ``module.Class.attribute`` (or
    ``module.function``), read without binding it."""
    parts = qualified_name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            value = vars(value)[part] if isinstance(value, type) else getattr(value, part)
        return value
    raise LookupError(qualified_name)


def digest(qualified_name: str) -> str:
    """sha256 of the source of ``qualified_name`` (all the functions behind it)."""
    attribute = resolve(qualified_name)
    functions = _functions(attribute) or [attribute]
    source = "".join(inspect.getsource(inspect.unwrap(f)) for f in functions)
    return hashlib.sha256(source.encode()).hexdigest()


def dependents() -> dict[str, str]:
    """Every pinned name -> what of ours to re-check when it changes."""
    needed = {name: ", ".join(ours) for name, ours in overrides().items()}
    for name, (modules, why) in COPIED.items():
        needed[name] = f"{needed[name]}; " if name in needed else ""
        needed[name] += f"{modules} ({why})"
    return needed


DEPENDENTS = dependents()


def test_every_override_of_a_mitmproxy_method_is_pinned() -> None:
    missing = sorted(set(overrides()) - set(PINNED))
    assert not missing, (
        "methods of aibridgeproxyd.mitm override these without a pinned digest; review the "
        "override against each and pin it (python -m tests.unit.test_mitm_digests): "
        + ", ".join(missing)
    )


def test_every_copied_function_is_pinned() -> None:
    missing = sorted(set(COPIED) - set(PINNED))
    assert not missing, f"COPIED entries without a pinned digest: {', '.join(missing)}"


def test_no_pin_is_left_without_a_dependent() -> None:
    stale = sorted(set(PINNED) - set(DEPENDENTS))
    assert not stale, (
        "pinned but no longer overridden or listed in COPIED (remove the pin): " + ", ".join(stale)
    )


@pytest.mark.parametrize("qualified_name", sorted(DEPENDENTS))
def test_mitmproxy_source_is_the_one_reviewed(qualified_name: str) -> None:
    if qualified_name not in PINNED:
        pytest.skip("not pinned: reported by the pin-coverage tests")
    assert digest(qualified_name) == PINNED[qualified_name], (
        f"{qualified_name} changed in the installed mitmproxy; re-check "
        f"{DEPENDENTS[qualified_name]} against its new source, then update its pin"
    )


if __name__ == "__main__":
    print("PINNED: dict[str, str] = {")
    for name in sorted(DEPENDENTS):
        print(f'    "{name}": "{digest(name)}",')
    print("}")
