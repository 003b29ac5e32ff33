"""Imported by every Triton module before `triton` itself: with no GPU, kernels run in Triton's
interpreter, which must be chosen (TRITON_INTERPRET=1) before triton defines them. A value the user
set wins, so `TRITON_INTERPRET=0` on a GPU machine is never overridden."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
