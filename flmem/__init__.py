"""flmem: measure and cut the memory of federated learning over gRPC."""
__version__ = "0.1.0"
