"""The SCons tool ``tdx``: ``Environment(tools=['default', 'tdx'], toolpath=[tdx_rules.TOOLPATH])``."""

from tdx_rules.scons.tool import exists, generate  # noqa: F401
