"""bytedeploy: new kinds of small language models from PyTorch training to fast inference on NVIDIA GPUs."""

__version__ = "0.1.0"
