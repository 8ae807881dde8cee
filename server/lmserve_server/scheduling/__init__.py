"""Scheduling: which requests run together and when; the model work is the engine's.

- ``batcher``: ``MicroBatcher``, a model-agnostic asyncio micro-batcher;
- ``static``: ``StaticScheduler``, the micro-batcher in front of one ``generate`` per batch;
- ``planner``: ``StepPlanner``, what the next continuous step runs (budget, chunks, admission);
- ``continuous``: ``ContinuousScheduler``, the planner and the engine's step runner in a loop;
- ``base``: the interface the service uses, and what both share.
"""
