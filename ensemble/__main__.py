"""`python -m feedserve ...`: the `feedserve` command line (feedserve.ops.cli)."""

from feedserve.ops.cli import main

raise SystemExit(main())
