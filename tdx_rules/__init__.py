"""tdx-rules: SCons rules that build Intel TDX guest images.

Public surface: ``TOOLPATH`` (for ``toolpath=[...]``), ``generate``/``exists``
(the SCons tool), ``__version__``. Everything else is implementation.
"""

import os

__version__ = "0.1.0"

TOOLPATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site_tools")


def generate(env):
    from .scons.tool import generate as _generate
    _generate(env)


def exists(env):
    from .scons.tool import exists as _exists
    return _exists(env)
