"""Shared test setup: put the repository root on sys.path and keep CPU runs deterministic and small."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.manual_seed(0)
