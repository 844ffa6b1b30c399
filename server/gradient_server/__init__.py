"""The gradient service's server: graph IR, op table, autodiff, executor, gRPC service."""
