"""Poses as the standard library's csv module."""

SHADOWED = True
