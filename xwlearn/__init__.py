"""Learn a research paper by building it: notebook-first reimplementations of 26 papers, with fastai integration, CPU-scale reproductions and full GPU recipes."""

__version__ = "0.1.0"
