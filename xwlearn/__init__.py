"""Learn a research paper by building it: notebook-first reimplementations of 26 papers, with fastai integration, CPU-scale reproductions and full GPU recipes."""

__version__ = "0.1.0"

import warnings as _warnings
# fastai 2.8.12 calls `torch.jit.script` when imported, which torch 2.14 deprecates: one line of noise in every command,
# notebook and report. This file runs before any xwlearn module, so the filter is in place before any of them imports
# fastai. (nbdev rewrites only the docstring and the version line above and keeps the rest of this file.)
_warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
