"""Session-wide test setup.

Triton decides at decoration time whether an `@triton.jit` kernel is compiled or interpreted, so the interpreter
must be chosen before any kernel module is imported — and pytest-xdist workers import many modules (notebooks run
in-process) in no fixed order. On a machine without a CUDA GPU every kernel therefore runs under Triton's CPU
interpreter (`TRITON_INTERPRET=1`), set here before any test module is collected; on a GPU machine nothing changes.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch
    if not torch.cuda.is_available(): os.environ["TRITON_INTERPRET"] = "1"
