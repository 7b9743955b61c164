"""Training across processes: TransformerXL under DDP and FSDP2 (``fully_shard``) on a 2-process gloo group equals
one process training on the combined batch, with cross-head, skip-retain and memory replay (MRBP); every rank draws
the same skip decisions and head permutations."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import assert_close_to_reference, gloo_group, spawn_ranks
from memtx_ops.nn import SegmentRollout, TransformerXL

B, L, STEPS, SEGMENTS = 4, 6, 3, 3
OPTIONS = {"forward": dict(cross_head_p=0.5, skip_retain_p=0.5, skip_schedule="uniform"),
           "replay": dict(cross_head_p=0.5)}


def make_model(path):
    torch.manual_seed(0)
    model = TransformerXL(n_token=19, n_layer=3, n_head=2, d_model=16, d_head=8, d_inner=32, mem_len=L, dropout=0.0,
                          **OPTIONS[path]).double()
    for layer in model.layers:  # the draws' generators, seeded alike everywhere (ranks also sync from rank 0)
        if layer.cross_head is not None:
            layer.cross_head.generator = torch.Generator().manual_seed(11)
    if model.skip_retain is not None:
        model.skip_retain.generator = torch.Generator().manual_seed(12)
    return model


def batches(path):
    gen = torch.Generator().manual_seed(5)
    per_step = SEGMENTS if path == "replay" else 1
    return [[torch.randint(0, 19, (B, L + 1), generator=gen) for _ in range(per_step)] for _ in range(STEPS)]


def train(model, step_fn, path, rows):
    """STEPS optimiser steps over the batch rows ``rows`` -> the draws made (skip decisions, permutations)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    memory, draws = None, []
    original_decide = model.skip_retain.decide if model.skip_retain is not None else None
    if original_decide is not None:
        model.skip_retain.decide = lambda training: draws.append(original_decide(training)) or draws[-1]
    for chunk in batches(path):
        chunk = [segment[rows] for segment in chunk]
        optimizer.zero_grad()
        if path == "replay":
            losses, memory = step_fn([s[:, :-1] for s in chunk], [s[:, 1:] for s in chunk], memory)
            loss = sum(losses) / len(losses)
        else:
            loss, memory = step_fn(chunk[0][:, :-1], memory, chunk[0][:, 1:])
        loss.backward()
        optimizer.step()
        memory = [type(m)(m.hidden.detach(), m.age, m.mem_offset) for m in memory]
    draws += [layer.cross_head.generator.get_state().sum().item() for layer in model.layers
              if layer.cross_head is not None]
    return draws


def _rank_main(rank, world, store_file, out_dir, wrapper, path):
    with gloo_group(rank, world, store_file, timeout_s=300):
        model = make_model(path)
        rows = slice(rank * B // world, (rank + 1) * B // world)
        unit = SegmentRollout(model) if path == "replay" else model
        if wrapper == "ddp":
            # skipped layers (skip-retain) produce no gradient in a step: DDP must look for unused parameters
            wrapped = torch.nn.parallel.DistributedDataParallel(unit, find_unused_parameters=path == "forward")
        else:
            from torch.distributed.fsdp import fully_shard

            # One FSDP group over the whole model: its layers share r_w_bias and r_r_bias (Transformer-XL's tied
            # biases), which FSDP2 cannot place in per-layer groups.
            wrapped = fully_shard(unit)
        draws = train(model, wrapped, path, rows)
        if wrapper == "fsdp2":
            params = {name: p.full_tensor().detach() for name, p in model.named_parameters()}
        else:
            params = {name: p.detach().clone() for name, p in model.named_parameters()}
        torch.save((params, draws), os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.parametrize("path", ["forward", "replay"])
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path, wrapper, path):
    spawn_ranks(_rank_main, (2, str(tmp_path / "store"), str(tmp_path), wrapper, path),
                [str(tmp_path / f"{rank}.pt") for rank in (0, 1)])
    model = make_model(path)
    unit = SegmentRollout(model) if path == "replay" else model
    want_draws = train(model, unit, path, slice(0, B))
    want = {name: p.detach() for name, p in model.named_parameters()}
    for rank in (0, 1):
        params, draws = torch.load(tmp_path / f"{rank}.pt")
        assert draws == want_draws, f"rank {rank} drew other skip decisions or permutations"
        assert_close_to_reference(params, want, torch.float64, context=f"{wrapper} {path} rank {rank}:")
