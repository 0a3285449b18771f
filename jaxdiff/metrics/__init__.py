"""Sample-quality metrics."""
from jaxdiff.metrics.sliced_wasserstein import sliced_wasserstein

__all__ = ["sliced_wasserstein"]
