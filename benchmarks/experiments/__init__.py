"""One-off measurements behind design choices of the native GPU path: kept runnable, not part of the product.

Each module's docstring says what it measures, how to run it and which results file holds its run. They need a
CUDA GPU.
"""
