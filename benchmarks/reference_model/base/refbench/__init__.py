"""Base class package of the reference benchmark game (importable by the reference runner via PYTHONPATH)."""
