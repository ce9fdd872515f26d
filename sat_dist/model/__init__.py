"""Llama blocks on local (tensor-parallel) shards, with SAT's gathered products."""
