"""Lets this repository's SConstruct files say ``tools=['tdx']``."""

from tdx_rules.scons.tool import exists, generate  # noqa: F401
