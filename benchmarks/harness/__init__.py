"""The benchmark harness shared by the ``bench_<op>.py`` scripts, one module per job.

A ``bench_<op>.py`` builds one case (:class:`~benchmarks.harness.case.CaseSetup`), describes its op
(:class:`~benchmarks.harness.spec.BenchSpec`) and calls :func:`~benchmarks.harness.sweep.bench_main`.

* ``constants``: paths (repository, results directory) and byte units; a leaf.
* ``retry``: ``import mlcontrast``, retried while its extension is being rebuilt.
* ``metadata``: the machine, versions, git commit, date and command line of a run.
* ``memory``: ``PeakMemory`` (extra peak of a region, CPU or CUDA), the address-space cap, ``is_oom``.
* ``timing``: ``time_phases`` / ``time_callable`` with warm-up, ``RepeatPolicy``, ``summarize``.
* ``output``: the JSON results file, the PNG plot, table and number formats.
* ``processes``: one case per process: ``run_case_subprocess`` (parent), ``child_main`` (child).
* ``devices``: dtype names, the CUDA device, TF32.
* ``rates``: the device's matmul rate and copy bandwidth (``python -m benchmarks.harness.rates``).
* ``case``: one case in the child (``run_case``), the providers and the function each one times.
* ``spec``: ``BenchSpec`` and the command line every bench script shares.
* ``analysis``: checks against the eager reference, throughput, speed-up and memory ratios.
* ``tables``: the console's per-case rows and the summary.
* ``largest_n``: the largest-N probe (``--max-n-probe``).
* ``sweep``: ``bench_main`` and ``run_sweep``, the whole sweep of one op.

Modules import only from modules above them in this list, so there is no import cycle. This file imports
nothing, so that ``python -m benchmarks.harness.rates`` runs its module once.
"""
