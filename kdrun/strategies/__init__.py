"""Strategies decide who teaches whom; each is a small :class:`~kdrun.strategies.base.Strategy`
whose ``run(ctx)`` returns a :class:`~kdrun.strategies.base.StrategyResult`."""
