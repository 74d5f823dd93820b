"""``python -m contrast.compare``: methods compared under one budget per run, over several seeds, with
the raw-pixel and random-network baselines, as ordinary run folders of the entry scripts; resumable;
one table (mean ± std) and one figure. Guide: ``docs/comparison.md``.

Modules: ``plan`` (rows, budget, jobs and their command lines), ``evaluations`` (the ``--eval``
kinds), ``runner`` (subprocesses, resumption, time budget), ``report`` (the table), ``figure`` (the
curves), ``cli`` (the command line).
"""
