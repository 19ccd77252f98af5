"""Benchmarks of scse-monai: ``python -m benchmarks.run [--only blocks,networks] [--quick]``."""
