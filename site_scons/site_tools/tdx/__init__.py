"""Lets this repository's SConstruct files say ``tools=['tdx']``."""

from tdx_rules.tool import exists, generate  # noqa: F401
