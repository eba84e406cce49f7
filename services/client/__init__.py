"""Python client helpers for MeshServe's public API (resuming broken streams)."""
