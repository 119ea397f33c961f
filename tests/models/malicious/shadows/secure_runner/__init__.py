"""Poses as the project's package."""

SHADOWED = True
