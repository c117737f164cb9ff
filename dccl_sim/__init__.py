"""dccl-sim: a simulator of Device-Cloud Collaborative Learning for recommendation, on Ray and PyTorch."""

__version__ = "0.1.0"
