"""Meta-World simulation: scripted-expert datasets (metaworld.py) and the `generate` CLI.

metaworld is an optional dependency (extra `sim`), imported only when a task is built.
"""
