"""Collect benchmarks/kernels/bench_*.py as test modules (`pytest benchmarks/kernels`)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # common.py


def pytest_collect_file(file_path, parent):
    # (a file named on the command line pytest collects by itself: collecting it here too ran it twice)
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
