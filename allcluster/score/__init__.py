"""Overnight scoring: a Ray Data job that predicts and explains a whole image archive.

:mod:`.core` holds the pure stages (read + decode, predict + explain), :mod:`.ray_data` the Ray Data
wrapper and :func:`run_score`, :mod:`.output` the driver's shards/resume/summary, :mod:`.rows` the
result schema, :mod:`.inputs` the listing rules and :mod:`.estimate` the ``--dry-run`` estimate.
"""
