"""Shipyard's built-in plugins: step types and notifiers.

Each module is a plugin, registered through the ``shipyard`` entry-point group exactly like a
third-party one. A third-party plugin looks the same::

    # pyproject.toml
    [project.entry-points.shipyard]
    ansible = "shipyard_ansible"

    # shipyard_ansible.py
    import shipyard

    @shipyard.hookimpl
    def shipyard_register_step_types(registry):
        registry.add(PlaybookStep)
"""

from __future__ import annotations
