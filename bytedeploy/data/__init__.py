"""Training data: built-in sources, folders of files, and the bGPT CPU-state simulator."""
