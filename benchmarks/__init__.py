"""The benchmarks behind docs/performance.md; each module's docstring gives the command that made its results file.

experiments/ holds one-off measurements behind design choices of the native GPU path.
"""
