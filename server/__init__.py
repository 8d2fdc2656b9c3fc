"""nextbest's server: gRPC adapters, storage, CLI and the composition root."""
