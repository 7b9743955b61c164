"""The ahead-of-time compile check of the Triton kernels (bench/aot_triton.py, ``make check-aot``) and its committed
table, bench/results/triton-aot-3.6.0.json (Triton 3.6.0 is the GPU image's version).

The table must be current (compiled from today's kernel sources and config tables), complete (every kernel,
config, dtype, precision, mode and head-dim class for sm_90 and sm_80) and clean: every config compiles, fits its
target's shared memory, and no 16-bit config spills. Each failure the static review found has its own test here.
"""

from __future__ import annotations

import json
import os

import pytest

from bench import aot_triton

TABLE = os.path.join(aot_triton.ROOT, "bench", "results", "triton-aot-3.6.0.json")


@pytest.fixture(scope="module")
def table():
    with open(TABLE) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def jobs():
    return aot_triton.jobs(aot_triton.load_kernels())


def rows_of(table, **where):
    return [r for r in table["rows"] if all(r.get(k) == v for k, v in where.items())]


def test_table_is_current(table, jobs):
    """Compiled from today's sources: edit a kernel or a config table and this fails until `make check-aot`."""
    modules = sorted({j.module for j in jobs})
    assert table["meta"]["sources"] == {m: aot_triton.kernels_digest(m) for m in modules}, \
        "bench/results/triton-aot-3.6.0.json is stale: run `make check-aot`"


def test_table_covers_every_job(table, jobs):
    compiled = {(r["kernel"], r["dtype"], r["precision"], json.dumps(r["mode"]), r["D"], r["arch"], r["config"])
                for r in table["rows"] if not r.get("skipped")}
    wanted = {(j.kernel, j.dtype, j.precision, json.dumps(dict(j.mode)), j.head_dim, j.arch, j.label()) for j in jobs}
    assert wanted <= compiled, sorted(wanted - compiled)[:10]
    assert not table["meta"]["sample"], "the committed table is a full run (not --sample)"


def test_table_passes_the_check(table):
    assert aot_triton.check(table["rows"]) == []


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("kernel,mode,D", [
    ("_fwd_kernel", {"PARTIAL": False, "EXACT_PV": False}, 128),  # fp32 with TF32 allowed, D in (64, 128]: was
    ("_fwd_kernel", {"PARTIAL": True, "EXACT_PV": False}, 128),  # 360-557 KB
    ("_bwd_dq_kernel", {"DETERMINISTIC": False}, 256),  # fp32, D in (128, 256]: every dq config was over
    ("_bwd_dq_kernel", {"DETERMINISTIC": True}, 256),
])
@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_float32_groups_that_did_not_fit_now_fit(table, kernel, mode, D, arch, precision):
    rows = rows_of(table, kernel=kernel, dtype="float32", precision=precision, mode=mode, D=D, arch=arch)
    assert rows and all(r["ok"] and r["shared"] <= aot_triton.SHARED_LIMIT[arch] for r in rows), rows


def test_no_16bit_config_spills(table):
    """No fp16/bf16 config spills (the review found all of them at 255 registers with spills; the deterministic dr
    kernel at D = 256 spilled at every tile until it took its columns in blocks, the dk/dv kernel on sm_80 until it
    summed its scores a column block at a time)."""
    spilled = [r for r in table["rows"] if r["dtype"] != "float32" and r.get("ok")
               and (r["spill_stores"] or r["spill_loads"])]
    assert not spilled, spilled[:5]
    assert rows_of(table, kernel="_bwd_dr_kernel", dtype="bfloat16", D=256, arch=80)
    assert rows_of(table, kernel="_bwd_dkdv_kernel", dtype="float16", D=256, arch=80)
    assert all(r.get("registers") for r in table["rows"] if r.get("ok")), "a row without its ptxas registers"


def test_float32_compiles_with_tensor_core_dots(table):
    """3xTF32 by default (IEEE dots took 10-200 s a config on the CUDA cores): each fp32 config compiles in
    seconds."""
    seconds = [r["seconds"] for r in table["rows"] if r["dtype"] == "float32" and r.get("ok") and "seconds" in r]
    assert seconds and max(seconds) < 60, max(seconds)


def test_check_reports_every_kind_of_failure():
    base = dict(kernel="k", dtype="float16", precision="tf32", mode={}, D=64, arch=80, config="64x64 w4 s2",
                ok=True, shared=1000, registers=128, spill_stores=0, spill_loads=0)
    rows = [dict(base, config="a", ok=False, error="CompilationError: x"),
            dict(base, config="b", shared=200000),
            dict(base, config="c", spill_stores=8, spill_loads=8),
            dict(base, D=128, shared=170000)]
    failures = aot_triton.check(rows)
    assert any(f.startswith("does not compile") for f in failures)
    assert any(f.startswith("shared memory 200000 > 166912") for f in failures)
    assert any(f.startswith("spills 8 B") for f in failures)
    assert any(f.startswith("no config fits: k float16 tf32 {} 128 80") for f in failures)
    assert not any("64 80" in f and f.startswith("no config fits") for f in failures)  # config c fits (spills)
    assert aot_triton.check([dict(base, dtype="float32", spill_stores=8, spill_loads=8)]) == []  # fp32: recorded
    pipelined = dict(base, D=128, bound=128, async_copies=32)
    lost = aot_triton.check([pipelined, dict(pipelined, D=aot_triton.UNALIGNED_HEAD_DIM, async_copies=0)])
    assert lost and lost[0].startswith(f"no cp.async at D={aot_triton.UNALIGNED_HEAD_DIM}"), lost
    assert aot_triton.check([dict(pipelined, async_copies=0), dict(pipelined, D=72, async_copies=0)]) == []


def test_unaligned_head_dim_keeps_cp_async_pipelining(table):
    """The review: a D that is not a multiple of 16 switched off cp.async (its contiguous rows made every load
    scalar). At D = 72, as the launcher hands it over (rows padded by kernels.utils.aligned_rows), the attention
    kernels that stream with cp.async at D = 128 still do, every config."""
    rows = rows_of(table, D=aot_triton.UNALIGNED_HEAD_DIM)
    assert rows and all(r["ok"] for r in rows)
    for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        for r in (r for r in rows if r["kernel"] == kernel):
            aligned, = rows_of(table, kernel=kernel, dtype=r["dtype"], precision=r["precision"], mode=r["mode"],
                               D=r["bound"], arch=r["arch"], config=r["config"])
            assert r["async_copies"] > 0 or (aligned["async_copies"] == 0 and r["config"].endswith("s1")), r
        assert any(r["async_copies"] > 0 for r in rows if r["kernel"] == kernel), kernel


def test_ptxas_log_of_an_entry_and_a_called_function():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 16 bytes cumulative stack size\n"
           "ptxas info    : Function properties for helper\n"
           "    32 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n")
    assert aot_triton.ptxas_resources(log) == dict(registers=168, stack=32, spill_stores=12, spill_loads=12)
    assert aot_triton.ptxas_resources("nothing") == {}


def test_jobs_cover_every_mode_precision_and_target(jobs):
    kinds = {(j.kernel, j.dtype, j.precision, j.mode, j.arch) for j in jobs}
    for partial in (False, True):
        assert ("_fwd_kernel", "float32", "tf32x3", (("PARTIAL", partial), ("EXACT_PV", False)), 80) in kinds
        assert ("_fwd_kernel", "float32", "tf32x3", (("PARTIAL", partial), ("EXACT_PV", True)), 80) not in kinds
        assert ("_fwd_kernel", "bfloat16", "tf32", (("PARTIAL", partial), ("EXACT_PV", True)), 90) in kinds
    for mode in ((("DETERMINISTIC", False),), (("DETERMINISTIC", True),)):
        assert ("_bwd_dq_kernel", "bfloat16", "tf32", mode, 90) in kinds
    for exact_pv in (False, True):  # the merge of the split forward, writing a 16-bit out or the training's float32 one
        assert ("_merge_key_splits_kernel", "float16", "tf32", (("EXACT_PV", exact_pv),), 80) in kinds
    assert {j.head_dim for j in jobs} == {*aot_triton.HEAD_DIMS, aot_triton.UNALIGNED_HEAD_DIM}
    unaligned = {(j.kernel, j.dtype, j.arch) for j in jobs if j.head_dim == aot_triton.UNALIGNED_HEAD_DIM}
    attention = {"_fwd_kernel", "_merge_key_splits_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
                 "_bwd_dr_kernel"}
    assert {k for k, _, _ in unaligned} == attention
    assert {j.kernel for j in jobs} >= attention | {"_downsample_fwd_kernel", "_upsample_bwd_kernel"}
