"""The Model Runner: a gRPC server that hosts submissions in worker subprocesses.

This package's __init__ stays empty on purpose: the worker subprocess imports
`secure_runner.runner.worker`, and must not pull in grpc, keys or smp.
"""
