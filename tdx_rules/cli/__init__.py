"""The ``tdx-rules`` command: the parser and dispatch (main.py), one module per larger subcommand."""
