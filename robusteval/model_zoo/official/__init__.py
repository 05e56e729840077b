"""Official architectures of the papers' checkpoints, with the official module names.

Each module re-implements one released architecture so that the files the
papers' own code writes load without renaming keys. Nothing here is
registered by import; the registry dispatches to these builders.
"""
