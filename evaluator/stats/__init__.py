"""Statistics on a joined dataset: metrics, paired tests, always-valid sequences, off-policy
values."""
