"""gRPC and TLS plumbing shared by the runner, the orchestrator and the client."""
