"""The Model Orchestrator: the live list of a crunch's models, served over mTLS."""
