"""``python -m aibridgeproxyd``: the command line (``aibridgeproxyd.cli``)."""

from aibridgeproxyd.cli import main

raise SystemExit(main())
