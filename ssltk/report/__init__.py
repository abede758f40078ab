"""``ssltk report``: the study's tables and plots, read from the tracking store.

``results`` (what the study measured: cells, their runs and baselines, best layers, provenance),
``tables`` (``results.md``, ``results.csv``), ``plots`` (PNG figures) and ``command``
(:func:`~ssltk.report.command.write_report` and ``ssltk report``). This package imports nothing
itself, so the command line stays light.
"""
