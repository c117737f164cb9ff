"""dccl-sim: a simulator of Device-Cloud Collaborative Learning for recommendation, on Ray and PyTorch."""

import os

# Idle OpenMP threads sleep instead of spinning. With spinning, torch on 2 threads ran 2.5x slower than on one
# whenever another process held a core (simulations run several processes per machine); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
