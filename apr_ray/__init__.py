"""apr-ray: Ray-distributed reinforcement learning for Adaptive Parallel Reasoning."""

__version__ = "0.1.0"
