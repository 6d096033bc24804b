"""`python -m evaluator …` (see evaluator/cli.py)."""

from evaluator.cli import main

raise SystemExit(main())
