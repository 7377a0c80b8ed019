"""Typed run configuration: schema, loading with overrides, validation."""
