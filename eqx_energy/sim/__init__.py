"""Meta-World simulation: scripted-expert datasets (metaworld.py, the `generate` CLI), closed-loop
evaluation of chunked policies (evaluate.py) and its success-rate report with Wilson CIs (report.py).

metaworld is an optional dependency (extra `sim`), imported only when a task is built.
"""
