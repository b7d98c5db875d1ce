"""Architectures, the model registry and weight loading."""
