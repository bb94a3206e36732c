"""One-off benchmark scripts, run from the repository root as ``python -m benchmarks.<name>``.

Not part of the installed package; they may import ``loadtest`` (the ``inferq loadtest`` driver),
never the reverse.
"""
