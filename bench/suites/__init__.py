"""Bench suites, one module per op: each has NAME, BASELINE (the backend ratios are taken against) and
``run(opts) -> rows`` (dicts with op, case, backend, dtype and the measured fields)."""

from . import (causal_resample, cross_head, dropout, generation, hourglass, memory_replay, model, rel_memory_attention,
               replay, short_query)

SUITES = {s.NAME: s for s in (rel_memory_attention, cross_head, short_query, memory_replay, dropout, model, generation,
                              causal_resample, hourglass, replay)}
