"""Sub-commands of this package (registered from scalelab/cli.py STAGE_COMMAND_MODULES)."""

from __future__ import annotations


def register(sub, add_config_args) -> dict:
    return {}
