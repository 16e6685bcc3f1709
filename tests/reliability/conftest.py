"""The reliability suite (issue 8): faults, bad input, unsafe files. ``pytest -m reliability`` runs it alone.

Every test in this folder gets the ``reliability`` marker. The property tests use the hypothesis
profile ``ci``: derandomized (the same examples on every run), no example database, no deadline.
"""

import pathlib

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)

HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.reliability)
