"""Benchmarks of MUDD models against the transformers models of the same shape (`python -m benchmarks.run`)."""
