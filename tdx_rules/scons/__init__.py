"""The SCons glue: the builders and the image rule (tool.py) and the decider (statcache.py)."""
