"""The KServe V2 / Triton gRPC service and its protobuf codec."""
