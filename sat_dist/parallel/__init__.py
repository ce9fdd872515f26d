"""Parallelism: the communication hooks the model calls, the megatron-core groups, and every
access to DeepSpeed ZeRO's parameter and optimizer state (zero)."""
