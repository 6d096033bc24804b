"""`python -m evaluator …` (see evaluator/cli/)."""

from evaluator.cli import main

raise SystemExit(main())
