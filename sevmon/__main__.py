"""``python -m sevmon`` is the ``sevmon`` command."""

from sevmon.cli import main

raise SystemExit(main())
