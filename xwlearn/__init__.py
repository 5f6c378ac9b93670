"""Learn a research paper by building it: notebook-first reimplementations of 26 papers, with fastai integration, CPU-scale reproductions and full GPU recipes.

Modules:

- `xwlearn.core`: The ground floor of xwlearn: seeding, devices and CPU threads, the registry of the 26 papers, and the claims API that turns every quick reproduction into a row of `reports/claims.md`.
- `xwlearn.distributed`: Data-parallel training with fastai on GPUs *and* CPUs, under `torchrun` or `accelerate launch`: the narrow fixes fastai 2.8.12 needs, and an audit that proves the data parallelism is real.
- `xwlearn.recipes`: A recipe is a paper's full training setting, registered by name; `train` runs it — on one CPU, one GPU or many under `torchrun` / `accelerate launch` — with atomic checkpoints every epoch and `--resume`."""

__version__ = "0.1.0"
