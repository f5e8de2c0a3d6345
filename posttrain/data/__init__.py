"""Data: formats, sources, validation, filters."""
