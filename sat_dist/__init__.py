"""sat_dist: Sparsity-Accelerated Training (SAT) for Llama continual pre-training at scale."""

__version__ = "0.1.0"
