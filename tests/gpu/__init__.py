"""CUDA tests, collected as the package ``gpu`` so their conftest never shadows ``tests/conftest.py``."""
