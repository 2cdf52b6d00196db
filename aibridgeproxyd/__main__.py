from aibridgeproxyd.cli import main

raise SystemExit(main())
