"""Hot-path benchmarks (pytest-benchmark): see conftest.py."""
