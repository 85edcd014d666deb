"""Collect benchmarks/kernels/bench_*.py as test modules (`pytest benchmarks/kernels`)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # common.py


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
