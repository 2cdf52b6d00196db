"""The control channel between the main process and one worker (``workers`` > 1): a Unix socket
pair, one JSON object per frame, each frame a 4-byte big-endian length and then the UTF-8 JSON.

Once the worker has loaded its providers and is about to listen, it sends ``{"started": true}``
(until then it may take longer than any answer should: imports, the first reload). Then the main
process asks and the worker answers, one request at a time:

- ``{"command": "status"}`` -> ``{"ready", "listening", "providers_loaded", "stopping",
  "active_flows"}``;
- ``{"command": "metrics"}`` -> ``{"families": [...], "provider_info": "<text exposition>"}``
  (``aibridgeproxyd.metrics_sum.family_samples``);
- ``{"command": "reload"}`` -> ``{}``: reload providers now (SIGHUP);
- ``{"command": "reload", "wait": seconds}`` -> ``{"applied": bool}``: reload now and answer
  once that reload has ended (a management write is then in force in the worker), or after
  ``wait`` seconds (``applied`` false, as for a reload that failed);
- ``{"command": "stop", "now": false|true}`` -> ``{}``: drain and exit (SIGTERM); ``now`` skips
  the drain (a second SIGTERM).

End of file on the worker's side means the main process is gone: the worker drains and exits.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

# A metrics answer with 10,000 providers is a few megabytes; anything near this is a bug.
MAX_FRAME_BYTES = 256 * 1024 * 1024


class ChannelError(RuntimeError):
    """A frame that is too large or not a JSON object."""


async def send_frame(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    """Write one frame holding ``message`` and wait until the transport took it."""
    data = json.dumps(message, separators=(",", ":")).encode()
    writer.write(len(data).to_bytes(4, "big") + data)
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Read one frame. Raises ``asyncio.IncompleteReadError`` at end of file and
    ``ChannelError`` for a frame over ``MAX_FRAME_BYTES`` or not a JSON object."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_FRAME_BYTES:
        raise ChannelError(f"control frame of {size} bytes is over {MAX_FRAME_BYTES}")
    try:
        message = json.loads(await reader.readexactly(size))
    except ValueError as exc:
        raise ChannelError(f"control frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ChannelError("control frame is not a JSON object")
    return message
