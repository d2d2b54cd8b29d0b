"""Shared test setup: put the repository root on sys.path and keep CPU runs deterministic and small.

Tests use tiny models, for which one thread is fastest: extra OpenMP threads only add synchronisation, and on a
busy 2-core machine they make small matmuls 10-50x slower."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
torch.manual_seed(0)
