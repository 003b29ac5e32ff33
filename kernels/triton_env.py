"""Imported by every Triton module before `triton` itself: with no GPU, kernels run in Triton's
interpreter. TRITON_INTERPRET=1 must be set before triton is first imported (by anyone: torch.compile
imports it too), since triton's own @jit helpers (tl.sum's combine function, ...) are made then. A
value the user set wins, so `TRITON_INTERPRET=0` on a GPU machine is never overridden."""
import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") is None:
    if "triton" in sys.modules:
        raise ImportError("no GPU here, and triton was imported before TRITON_INTERPRET=1 was set, so its "
                          "interpreter cannot run these kernels: export TRITON_INTERPRET=1 before starting "
                          "Python (tests/conftest.py does it for the test suite)")
    os.environ["TRITON_INTERPRET"] = "1"
