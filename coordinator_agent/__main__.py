from __future__ import annotations

from coordinator_agent.cli.main import main

raise SystemExit(main())
