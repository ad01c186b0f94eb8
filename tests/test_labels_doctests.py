"""The examples in diffaug.labels' docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["balance", "condition", "enlarge", "hv", "validate"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"diffaug.labels.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
