"""`python -m rower` is the `rower` console script."""

from rower.cli import main

raise SystemExit(main())
