"""Parallelism: the communication hooks the model calls, and the megatron-core groups."""
