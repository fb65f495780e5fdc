"""dmb's benchmark suite: dmb beside channels_redis and InMemoryChannelLayer.

Run everything, one full run, from the repository root:

    .venv/bin/python -m benchmarks.run

``--quick`` shortens every scenario; ``--help`` lists the rest.  Results go
to ``benchmarks/results/`` (JSON and a Markdown report) and plots to
``docs/img/``.  See docs/performance.md for what each scenario measures.
"""
