"""Strategies decide who teaches whom; each is a small class with ``run(ctx) -> dict``.

The returned dict holds the ``summary.json`` sections the strategy knows
about (``student``, ``teacher``, ``scratch``, ...); :mod:`kdrun.run` adds the rest.
"""
