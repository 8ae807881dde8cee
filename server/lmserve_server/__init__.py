"""lmserve_server: the lmserve daemon (engine, micro-batcher, gRPC service, CLI)."""

__version__ = "0.1.0"
