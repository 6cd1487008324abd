"""fastcl ops: one folder per op (naive reference, chunked PyTorch, native, Triton)."""
