"""``sloth-core bench``: kernel and end-to-end training benchmarks, their reports and comparisons.

* :mod:`sloth_core.bench.kernels` (cases in :mod:`sloth_core.bench.cases`, its command line
  :mod:`sloth_core.bench.kernels_cli`) -- ``bench kernels``: every kernel at real model shapes vs HF eager,
  torch.compile and Liger-Kernel, with the ceilings measured in the run.
* :mod:`sloth_core.bench.train` (models in :mod:`sloth_core.bench.train_models`, its command line
  :mod:`sloth_core.bench.train_cli`; ``--flow sft``: :mod:`sloth_core.bench.sft`) -- ``bench train``: LoRA / QLoRA
  training steps, HF + PEFT vs sloth_core (and Liger).
* :mod:`sloth_core.bench.timing` -- CUDA-event timing over rotating input sets, peak memory, the ceilings.
* :mod:`sloth_core.bench.env` -- :func:`~sloth_core.bench.env.environment`, the facts a result file carries
  (GPU, driver, CUDA, library versions, git commit and dirtiness, command line, date).
* :mod:`sloth_core.bench.report` -- results as JSON, a terminal table, a Markdown report, PNG charts (when
  matplotlib is importable) and :func:`~sloth_core.bench.report.compare` of two result files.
* :mod:`sloth_core.bench.cli` -- the ``bench`` sub-command (``kernels``, ``train``, ``compare``).
"""
