"""Everything that depends on mitmproxy beyond its public addon API.

mitmproxy's addon API (hook signatures, ``http.HTTPFlow``, ``http.Response.make``, options) is
used everywhere; its proxy internals (``mitmproxy.proxy``: layers, events, commands, the
connection handler, private attributes) only here, so an upgrade of mitmproxy has this one
folder to re-check. Addons take the hook data types that live in ``mitmproxy.proxy`` from
``hooks``.

Outside this package, besides the addon API (``mitmproxy.http``, ``connection``, ``tls``,
``hooks``, ``ctx``, ``exceptions``), two public utility modules are used directly, since a
wrapper here would only rename them (``tests/unit/test_layout.py`` allows these and no other):

- ``mitmproxy.net.http.url`` (``aibridgeproxyd.adapters.bedrock``): the default port of a scheme,
  for the Host that SigV4 signs;
- ``mitmproxy.net.server_spec.ServerSpec`` (``addons/upstream_proxy.py``): the type of
  ``server_conn.via``, the corporate proxy a connection goes through.

The adapters import theirs inside the function that uses it: the CLI imports them and never
loads mitmproxy. Nothing decodes a body with ``mitmproxy.net.encoding`` (``get_content``):
it decodes in one call with no bound on the output, and keeps the last body it decoded.

- ``hooks``: the hook data types of ``mitmproxy.proxy`` (``NextLayer``,
  ``ServerConnectionHookData``), re-exported for the addons' hook signatures.
- ``layers``: which of our layers replace the ones mitmproxy proposes (``next_layer``).
- ``http_layer``: the HTTP layer of MITM'd connections (error answers in the client format,
  resend for key failover, upstream deadlines, HTTP/1.1 upstream pooling).
- ``client_bounds``, ``framing``, ``stream_bounds``, ``memory_budget``: bounds on what a client
  can make the proxy hold (heads, bodies, framing, HTTP/2 streams, WebSocket messages, memory).
- ``body_chunks``: the chunks of an upstream's chunked answer that one read holds go on as one
  body piece, not one trip through the layers each; 1xx heads before an answer passed over;
  bounds on an upstream's unfinished head, chunk-size line and trailer section.
- ``upstream_proxy``: the client-facing layer that chains through a corporate proxy.
- ``tls``: TLS to an ``https://`` corporate proxy, and telling the listener's TLS apart.
- ``connections``: a client connection's handler: closing, raw writes, activity, slots.
- ``tunnel_relay``: the fast path of a tunnel: once quiet, its two sockets are relayed by
  asyncio protocols outside the layers, which are told of each end as before.
- ``splice_relay``: the zero-copy relay of a fast-path tunnel (``os.splice`` through two pipes),
  within the descriptors ``max_connections`` leaves; the copying relay otherwise.
- ``listen_socket``: the proxy listener on a socket of ours (a worker's ``SO_REUSEPORT`` one).
- ``responses``: responses the addons and the layers share.
- ``leaf_certs``: eviction of MITM leaf certificates close to expiry.
- ``dispatch``: ``HookDispatch``, mitmproxy's ``AddonManager`` calling each event's handlers
  from a list built once per chain instead of walking every addon on every event.
- ``master``: mitmproxy's ``Master`` as the daemon embeds it: construction, the built-in addons
  installed, listen addresses and failures, closing every client at the end of a drain.

Private attributes used here, and why (each is also commented where it is used):

- ``Layer._handle_event`` (``client_bounds``, ``http_layer``, ``stream_bounds``,
  ``upstream_proxy``): overridden, and reassigned as the current state, the way mitmproxy's own
  layers run their state machines (``client_bounds`` also sets it, once per round of the upstream
  deadline check, to a one-event detour that notes the upstream's progress); every override is
  pinned (below).
- ``Layer._paused`` (``http_layer``, ``client_bounds``): the only record of which command a
  stream waits on; needed to withdraw a connection request its client abandoned, and to leave a
  paused stream's deadlines to the next round.
- ``ConnectionHandler.transports`` / ``max_conns`` / ``timeout_watchdog`` (``connections``,
  ``tunnel_relay``): no API exposes a client's sockets, slots or last activity.
  ``drain_writers`` (``connections``) is replaced per handler by one that skips the drain after
  a read when nothing waits to be written: mitmproxy's costs a lock and a drain per socket, for
  every chunk of a streamed answer.
- ``asyncio.StreamReader._waiter`` / ``_buffer`` (``tunnel_relay``): the only sign that a reader
  task of mitmproxy's waits with every byte it read already handed on, which is when a tunnel's
  sockets can change hands without reordering a byte.
- ``WebsocketConnection._proto`` and ``PerMessageDeflate._decompressor`` (``stream_bounds``):
  the only way to bound a WebSocket message before wsproto assembles or inflates it whole.
- ``SSL._lib``, ``Connection._ssl``, ``SSL._openssl_assert`` (``tls``): pyOpenSSL has no API
  for the certificate name check; mitmproxy's ``TlsConfig`` makes the same calls.
- ``validate._valid_header_name`` (``framing``): mitmproxy's own token pattern, so our check and
  its parser agree on what a header name is.
- ``AddonManager._configure_all`` (``dispatch``): disconnected from the options' change signal
  when ``HookDispatch`` replaces the manager ``Master`` made, so options reach only the new one.
- ``Master._legacy_log_events`` (``master``): uninstalled, because it forwards every log record
  to a deprecated hook through the event loop, which fails once the loop has closed.
- ``Proxyserver.servers`` and ``Servers.changed`` (``listen_socket``): no option makes
  mitmproxy listen on a socket bound already; each new server instance gets a ``listen`` of ours
  when the signal announces it, before it starts.
- ``Http1Connection.body_reader`` (``body_chunks``): public, but set and read only inside
  mitmproxy's HTTP/1 layer; an upstream connection's ``Http1Client`` gets the class
  ``CoalescingHttp1Client`` (``__class__`` assigned: mitmproxy's ``HttpClient`` makes it), whose
  ``__setattr__`` wraps each chunked reader as it is set (read_headers, read_body and the reader
  mitmproxy makes are pinned).
- h11's ``ReceiveBuffer._data`` (``body_chunks``): the first bytes of an upstream connection's
  buffer, to tell a 1xx head before mitmproxy parses it (the public ``bytes(buf)`` copies the
  whole buffer, at every read of a head that arrives slowly); ``ReceiveBuffer`` is pinned.
- ``master.addons.get("tlsconfig").certstore`` (``leaf_certs``): no private name, but mitmproxy's
  leaf cache has no API; eviction reaches into it here only.

Pins: ``tests/unit/test_mitm_digests.py`` holds the sha256 of the source of every mitmproxy,
wsproto or h2 method a class of this package overrides, found by walking the classes here, so a new
override without a pin fails too; and of every function copied or relied upon without an
override (``COPIED`` there). An upgrade that changes one fails with its qualified name and the
modules of ours to re-check. After re-checking them, regenerate the pins with
``python -m tests.unit.test_mitm_digests``.
"""
