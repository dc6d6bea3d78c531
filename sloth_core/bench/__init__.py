"""``sloth-core bench``: kernel and end-to-end training benchmarks, their reports and comparisons.

* :mod:`sloth_core.bench.env` -- :func:`~sloth_core.bench.env.environment`, the facts a result file carries
  (GPU, driver, CUDA, library versions, git commit, command line, date).
* :mod:`sloth_core.bench.report` -- results as JSON, a terminal table, a Markdown report, PNG charts (when
  matplotlib is importable) and :func:`~sloth_core.bench.report.compare` of two result files.
* :mod:`sloth_core.bench.cli` -- the ``bench`` sub-command (``kernels``, ``train``, ``compare``).

The GPU runners themselves are still the scripts in ``benchmarks/`` (``bench_loss.py``, ``bench_dequant.py``,
``bench_train_step.py``, ``bench_autotune.py``).
"""
