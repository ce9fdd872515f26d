"""Data pipeline: text -> tokens -> megatron-core indexed dataset -> packed, shuffled samples.

- tokenizer.py: SentencePiece / HF tokenizer.json behind one interface; train a small BPE.
- indexed.py:   write and read PREFIX.bin/.idx (megatron-core's format), checked on open.
- packing.py:   EOS-joined stream cut into seq_length + 1 samples, train/valid/test splits,
                per-epoch shuffles, and per-step DP micro-batches addressed by consumed samples.
tools/preprocess_data.py is the command-line front end. Submodules are imported on use, so
the preprocessing tool never loads torch.
"""
