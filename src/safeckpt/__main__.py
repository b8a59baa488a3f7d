"""``python -m safeckpt``: the same command as the ``safeckpt`` console script."""

from .cli import main

raise SystemExit(main())
