"""Shadow copies to challengers: per-model lanes that never hold up the client, and batching."""
