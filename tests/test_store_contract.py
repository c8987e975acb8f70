"""The store contract suite (tests/store_contract.py), run against every backend of
``STORE_BACKENDS`` in tests/conftest.py through the ``store_factory`` fixture."""

from __future__ import annotations

from store_contract import *  # noqa: F403  (its tests are collected here)
