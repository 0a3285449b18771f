"""Shared test setup: float32 CPU JAX, deterministic keys."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
