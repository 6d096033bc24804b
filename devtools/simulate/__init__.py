"""Monte Carlo simulations whose results docs/STATISTICS.md, DRIFT.md and EXPLORATION.md record."""
