"""The stages of an image: one module each, a pure function plus a ``python -m`` entry point."""
