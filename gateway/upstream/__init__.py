"""Calling Triton: the HTTP keep-alive pool and the gRPC client, one per model server."""
