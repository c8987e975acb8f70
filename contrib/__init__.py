"""Optional integrations with extra dependencies (``shipyard.contrib``)."""

from __future__ import annotations
