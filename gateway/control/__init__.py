"""The control plane: the challenger registry, its state, its storage and the audit trail."""
