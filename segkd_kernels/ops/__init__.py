"""One folder per op: api.py (validation + the single dispatch), reference.py (pure PyTorch oracle),
triton.py and cuda.py (fused kernels registered as torch.library custom ops) where they exist."""
