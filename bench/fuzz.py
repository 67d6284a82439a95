"""Fuzz the paths added last against the float64 reference (issue 24): random patterns (documents with
every integer id dtype, top-k, windows, chunks, global tokens, random and user blocks, their & / | and
per-head combinations), score modifiers, dtypes, input strides, key padding with NaN garbage, inference
mode followed by training, several threads at once, both engines of the PyTorch backend, varlen batches,
and context parallelism over 2 to 4 gloo processes (with shards that disagree across ranks now and then).

Each case compares out, lse and the gradients of q, k, v (and rel_bias) with `attention_reference` in
float64, within twice the error the same reference math has in the input dtype plus a small floor (the
rule of `tests/reference_check.py`); bad combinations must raise a ValueError/TypeError, never a crash.

    python bench/fuzz.py --cases 2000 --cp-cases 60 --seed 0     # progress printed, summary saved
    python bench/fuzz.py --cases 20 --cp-cases 0 --seed 1         # a quick run

Saves ``bench/results/fuzz-cpu.json``: counts per kind, failures with the case that failed (re-run one
with ``--only KIND:SEED``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests"))

from reference_check import FLOORS, loss_of, max_err  # noqa: E402

import sparse_attn as sa  # noqa: E402
from sparse_attn.backends import cpu_kernel  # noqa: E402
from sparse_attn.reference import attention_reference  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16)
KINDS = ("attention", "varlen", "cp")


# -- random patterns ---------------------------------------------------------------------------------------
def _ids(rng: random.Random, batch: int | None, seq: int) -> torch.Tensor:
    """Sorted document ids of a random integer dtype, with values near both ends of its range."""
    dtype = rng.choice(ID_DTYPES)
    info = torch.iinfo(dtype)
    lo = max(info.min, -(2**40))
    hi = min(info.max, 2**40)
    rows = []
    for _ in range(batch or 1):
        n_docs = rng.randint(1, max(1, min(8, seq)))
        values = sorted(rng.randint(lo, hi) for _ in range(n_docs))
        cuts = sorted(rng.randint(0, seq) for _ in range(n_docs - 1))
        bounds = [0, *cuts, seq]
        rows.append([values[d] for d in range(n_docs) for _ in range(bounds[d + 1] - bounds[d])])
    ids = torch.tensor(rows, dtype=torch.int64).to(dtype)
    return ids if batch is not None else ids[0]


def _leaf(rng: random.Random, sq: int, skv: int, batch: int, allow_data: bool = True):
    kinds = ["causal", "window", "dilated", "global", "chunked", "random", "block_sparse"]
    if allow_data:
        kinds += ["documents", "documents"]
    kind = rng.choice(kinds)
    huge = rng.random() < 0.1  # extents beyond every sequence mean "all of them"
    if kind == "causal":
        return sa.causal()
    if kind == "window":
        return sa.sliding_window(2**70 if huge else rng.randint(0, 80), rng.randint(0, 40))
    if kind == "dilated":
        return sa.dilated(
            rng.randint(0, 30), rng.randint(0, 10), dilation=2**70 if huge else rng.randint(1, 5)
        )
    if kind == "global":
        if rng.random() < 0.5:
            return sa.global_tokens(2**70 if huge else rng.randint(0, 6))
        return sa.global_tokens(rng.sample(range(skv), min(skv, rng.randint(0, 4))))
    if kind == "chunked":
        return sa.chunked(2**70 if huge else rng.randint(1, 90))
    if kind == "random":
        return sa.random_blocks(rng.randint(0, 3), rng.choice([8, 16, 32]), seed=rng.randint(-(2**70), 2**70))
    if kind == "block_sparse":
        cell = rng.choice([8, 16, 32, (16, 8)])
        cq, ck = (cell, cell) if isinstance(cell, int) else cell
        g = torch.Generator().manual_seed(rng.randint(0, 2**31))
        return sa.block_sparse(torch.rand(-(-sq // cq), -(-skv // ck), generator=g) < 0.4, cell)
    return sa.documents(_ids(rng, rng.choice([None, batch]), skv))


def _static(rng, sq, skv, batch, allow_data=True, depth=0):
    p = _leaf(rng, sq, skv, batch, allow_data)
    if depth < 2 and rng.random() < 0.5:
        other = _static(rng, sq, skv, batch, allow_data, depth + 1)
        p = p & other if rng.random() < 0.5 else p | other
    return p


def random_pattern(rng, sq, skv, batch, heads, *, allow_topk=True, allow_data=True):
    if rng.random() < 0.15:
        p = sa.per_head([_static(rng, sq, skv, batch, allow_data, 1) for _ in range(heads)])
    else:
        p = _static(rng, sq, skv, batch, allow_data)
    if allow_topk and rng.random() < 0.25:
        top = sa.topk_blocks(2**70 if rng.random() < 0.1 else rng.randint(1, 4))
        p = top & p if rng.random() < 0.6 else top | p
    return p


# -- comparison ----------------------------------------------------------------------------------------------
def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "bshd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "last_dim_stride_2":
        return torch.stack([t, t], -1)[..., 0]
    if how == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _plain_error(plain: torch.Tensor, truth: torch.Tensor) -> float:
    """The plain reference math's error in the input dtype; inf where that math overflowed."""
    try:
        return max_err(plain, truth)
    except AssertionError:
        return math.inf


def _check(got: dict, truth: dict, plain: dict, dtype, plain32: dict | None = None) -> list[str]:
    problems = []
    for name, t in truth.items():
        g = got.get(name)
        if g is None:
            problems.append(f"{name} missing")
            continue
        if g.isnan().any():
            problems.append(f"{name} has NaN")
            continue
        bad = g.isinf() & ~t.isinf()
        if bad.any():
            problems.append(f"{name} has {int(bad.sum())} inf entries where the reference is finite")
            continue
        try:
            err = max_err(g, t)
        except AssertionError as e:
            problems.append(f"{name}: {e}")
            continue
        plain_err = _plain_error(plain[name], t)
        if not math.isfinite(plain_err) and plain32 is not None:
            # The plain math overflowed in fp16 (it has no fp32 accumulator): fall back to fp32's error,
            # scaled by the ratio of the two machine epsilons.
            ratio = torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
            plain_err = _plain_error(plain32[name], t) * ratio
        allowed = 2 * plain_err + FLOORS[dtype]
        if not err <= allowed:
            problems.append(f"{name}: error {err:.3g} > allowed {allowed:.3g}")
    return problems


def _results(fn, q, k, v, rel_bias, dtype, grads=True):
    leaves = [t.detach().to(dtype).requires_grad_(grads) for t in (q, k, v)]
    rb = None if rel_bias is None else rel_bias.detach().to(dtype).requires_grad_(grads)
    out, lse = fn(*leaves, rb)
    result = {"out": out.detach(), "lse": lse.detach()}
    if grads:
        wrt = leaves + ([rb] if rb is not None else [])
        names = ["dq", "dk", "dv", "d_rel_bias"][: len(wrt)]
        grads = torch.autograd.grad(loss_of(out, lse), wrt, allow_unused=True)
        grads = [torch.zeros_like(w) if d is None else d for d, w in zip(grads, wrt, strict=True)]
        result.update(zip(names, grads, strict=True))
    return result


# -- one attention case --------------------------------------------------------------------------------------
def attention_case(seed: int) -> dict:
    rng = random.Random(seed)
    batch, hkv, group = rng.randint(1, 2), rng.randint(1, 2), rng.randint(1, 2)
    hq = hkv * group
    skv = rng.randint(1, 200)
    sq = skv if rng.random() < 0.6 else rng.randint(1, 200)
    dim = rng.choice([16, 24, 32])
    dtype = rng.choice(DTYPES)
    pattern = random_pattern(rng, sq, skv, batch, hq)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, sq, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, hkv, skv, dim, generator=g, dtype=torch.float64) for _ in range(2))
    key_mask = torch.rand(batch, skv, generator=g) < 0.8 if rng.random() < 0.3 else None
    mods = {}
    if rng.random() < 0.3:
        mods["softcap"] = rng.choice([0.5, 2.0, 30.0, 2.0**64])
    if rng.random() < 0.3:
        mods["alibi_slopes"] = (
            torch.rand(*rng.choice([(hq,), (batch, hq)]), generator=g, dtype=torch.float64) * 0.3
        )
    rel_bias = (
        torch.randn(hq, sq + skv - 1, generator=g, dtype=torch.float64) if rng.random() < 0.25 else None
    )
    return dict(
        seed=seed, pattern=pattern, q=q, k=k, v=v, key_mask=key_mask, mods=mods, rel_bias=rel_bias, dtype=dtype,
        strides=rng.choice(["contiguous", "bshd", "last_dim_stride_2", "channels_last"]),
        engine=rng.choice(["kernel", "aten"]), eval_first=rng.random() < 0.3, threads=rng.choice([1, 1, 1, 3]),
        describe=f"B={batch} Hq={hq} Hkv={hkv} Sq={sq} Skv={skv} D={dim} {dtype} {pattern!r}",
    )  # fmt: skip


def _mask_of(c: dict):
    """What the call must apply: the pattern, or for top-k patterns the layout selected from these inputs."""
    pattern, q, k = c["pattern"], c["q"].to(c["dtype"]), c["k"].to(c["dtype"])
    if sa.patterns.topk.selects(pattern):
        return sa.select_layout(pattern, q, k, key_mask=c["key_mask"])
    return pattern


def run_attention_case(c: dict) -> list[str]:
    dtype, key_mask, mods, rel_bias = c["dtype"], c["key_mask"], c["mods"], c["rel_bias"]
    mask = _mask_of(c)
    q, k, v = c["q"], c["k"], c["v"]
    if key_mask is not None:
        # The reference multiplies by zero weights, so it gets zeros; the call gets NaN in padded keys.
        keep = key_mask[:, None, :, None]
        k, v = (torch.where(keep, t, 0.0) for t in (k, v))
        garbage = [torch.where(keep, t, float("nan")) for t in (k, v)]
    else:
        garbage = [k, v]

    def reference(dt):
        def fn(q_, k_, v_, rb):
            m = {n: (t.to(dt) if isinstance(t, torch.Tensor) else t) for n, t in mods.items()}
            return attention_reference(q_, k_, v_, mask, key_mask=key_mask, rel_bias=rb, **m)

        return _results(fn, q, k, v, rel_bias, dt)

    truth = reference(torch.float64)
    plain = reference(dtype)
    plain32 = reference(torch.float32) if dtype == torch.float16 else None

    def call(q_, k_, v_, rb):
        q_, k_, v_ = (_strided(t, c["strides"]) for t in (q_, k_, v_))
        m = {n: (t.to(dtype) if isinstance(t, torch.Tensor) else t) for n, t in mods.items()}
        return sa.sparse_attention(
            q_, k_, v_, c["pattern"], key_mask=key_mask, return_lse=True, backend="torch", rel_bias=rb, **m
        )

    cpu_kernel.set_engine(c["engine"])
    try:
        if c["eval_first"]:
            # Evaluation first (layouts and tables cached under inference mode), then training.
            with torch.inference_mode():
                got = _results(call, q, *garbage, rel_bias, dtype, grads=False)
            problems = _check(got, {n: truth[n] for n in ("out", "lse")}, plain, dtype, plain32)
        else:
            problems = []
        results, errors = [None] * c["threads"], []

        def work(t):
            try:
                results[t] = _results(call, q, *garbage, rel_bias, dtype)
            except Exception as e:  # noqa: BLE001 - reported as the case's failure
                errors.append(f"{type(e).__name__}: {e}")

        workers = [threading.Thread(target=work, args=(t,)) for t in range(c["threads"])]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            return problems + errors[:1]
        for t, got in enumerate(results):
            problems += [
                f"thread {t}: {p}" if c["threads"] > 1 else p
                for p in _check(got, truth, plain, dtype, plain32)
            ]
        return problems
    finally:
        cpu_kernel.set_engine(None)


# -- one varlen case -----------------------------------------------------------------------------------------
def varlen_case(seed: int) -> dict:
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    lens_q = [rng.choice([0, rng.randint(1, 70)]) for _ in range(n)]
    lens_k = [lq if rng.random() < 0.6 else rng.choice([0, rng.randint(1, 70)]) for lq in lens_q]
    hkv, group = rng.randint(1, 2), rng.randint(1, 2)
    hq = hkv * group
    band = lambda: rng.choice(  # noqa: E731
        [sa.causal(), sa.sliding_window(rng.randint(0, 30), rng.randint(0, 10)), sa.dilated(8, 2, dilation=3)]
    )
    pattern = rng.choice(
        [None, band(), band() & band(), band() | band(), sa.per_head([band() for _ in range(hq)])]
    )
    g = torch.Generator().manual_seed(seed)
    dim, dtype = rng.choice([16, 32]), rng.choice(DTYPES)
    q = torch.randn(sum(lens_q), hq, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(sum(lens_k), hkv, dim, generator=g, dtype=torch.float64) for _ in range(2))
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return dict(
        seed=seed, pattern=pattern, q=q, k=k, v=v, cu_q=cu(lens_q), cu_k=cu(lens_k), dtype=dtype,
        engine=rng.choice(["kernel", "aten"]), describe=f"lens_q={lens_q} lens_k={lens_k} Hq={hq} {dtype} {pattern!r}",
    )  # fmt: skip


def run_varlen_case(c: dict) -> list[str]:
    dtype, cu_q, cu_k, pattern = c["dtype"], c["cu_q"], c["cu_k"], c["pattern"]
    if c["q"].shape[0] == 0 or c["k"].shape[0] == 0:
        return []

    def reference(q, k, v, rb):
        outs, lses = [], []
        for s in range(len(cu_q) - 1):
            a, b, x, y = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
            if b == a:
                continue
            qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[a:b], k[x:y], v[x:y]))
            if y == x:
                outs.append(qs[0].transpose(0, 1) * 0)
                lses.append(torch.full((q.shape[1], b - a), float("-inf"), dtype=q.dtype))
                continue
            o, lse = attention_reference(qs, ks, vs, pattern)
            outs.append(o[0].transpose(0, 1))
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, 1)

    truth = _results(reference, c["q"], c["k"], c["v"], None, torch.float64)
    plain = _results(reference, c["q"], c["k"], c["v"], None, dtype)
    plain32 = (
        _results(reference, c["q"], c["k"], c["v"], None, torch.float32) if dtype == torch.float16 else None
    )
    cpu_kernel.set_engine(c["engine"])
    try:
        call = lambda q, k, v, rb: sa.sparse_attention_varlen(  # noqa: E731
            q, k, v, cu_q, cu_k, pattern, return_lse=True, backend="torch"
        )
        got = _results(call, c["q"], c["k"], c["v"], None, dtype)
    finally:
        cpu_kernel.set_engine(None)
    return _check(got, truth, plain, dtype, plain32)


# -- context parallelism: one spawn of `world` gloo processes runs many cases ------------------------------
def cp_case(seed: int, world: int) -> dict:
    rng = random.Random(seed)
    order = rng.choice(["contiguous", "zigzag"])
    chunks = world * (2 if order == "zigzag" else 1)
    shard = (world and chunks // world) * rng.randint(8, 50)  # a multiple of the chunks per rank
    seq = shard * world
    batch, hkv, group = rng.randint(1, 2), rng.randint(1, 2), rng.randint(1, 2)
    hq = hkv * group
    pattern = random_pattern(rng, seq, seq, batch, hq, allow_topk=False)
    dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16])
    unequal = rng.random() < 0.1  # the last rank passes a shorter shard: every rank must raise alike
    return dict(
        seed=seed, world=world, order=order, shard=shard, batch=batch, hq=hq, hkv=hkv, dim=16, dtype=dtype,
        pattern=pattern, unequal=unequal, describe=f"P={world} {order} shard={shard} B={batch} Hq={hq} "
        f"Hkv={hkv} {dtype}{' unequal' if unequal else ''} {pattern!r}",
    )  # fmt: skip


def _cp_inputs(c: dict):
    g = torch.Generator().manual_seed(c["seed"])
    seq = c["shard"] * c["world"]
    q = torch.randn(c["batch"], c["hq"], seq, c["dim"], generator=g, dtype=torch.float64)
    k, v = (
        torch.randn(c["batch"], c["hkv"], seq, c["dim"], generator=g, dtype=torch.float64) for _ in range(2)
    )
    return q, k, v


def _loss_weights(c: dict):
    """The weights `loss_of` draws for the whole sequence's out and lse."""
    g = torch.Generator().manual_seed(1)
    seq = c["shard"] * c["world"]
    w_out = torch.randn(c["batch"], c["hq"], seq, c["dim"], generator=g, dtype=torch.float64)
    return w_out, torch.randn(c["batch"], c["hq"], seq, generator=g, dtype=torch.float64)


def _cp_worker(rank: int, world: int, store: str, cases: list[dict], out_dir: str) -> None:
    import torch.distributed as dist

    from sparse_attn.distributed import context_parallel_attention, shard_sequence

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results = []
    try:
        for c in cases:
            q, k, v = (shard_sequence(t, rank, world, order=c["order"]) for t in _cp_inputs(c))
            if c["unequal"] and rank == world - 1:
                q, k, v = (t[:, :, : t.shape[2] // 2] for t in (q, k, v))
            leaves = [t.to(c["dtype"]).requires_grad_() for t in (q, k, v)]
            try:
                out, lse = context_parallel_attention(
                    *leaves, c["pattern"], return_lse=True, order=c["order"]
                )
                # This rank's rows of the whole-sequence loss (`loss_of` draws its weights for the whole).
                w_out, w_lse = (shard_sequence(w, rank, world, order=c["order"]) for w in _loss_weights(c))
                finite = torch.where(lse.isinf(), torch.zeros_like(lse), lse)
                ((out.double() * w_out).sum() + (finite.double() * w_lse).sum()).backward()
                result = {"out": out.detach(), "lse": lse.detach()}
                result.update({f"d{n}": t.grad for n, t in zip("qkv", leaves, strict=True)})
            except ValueError as e:
                result = {"error": str(e)}
            results.append(result)
    finally:
        torch.save(results, f"{out_dir}/results.{rank}.pt")
        dist.destroy_process_group()


def run_cp_cases(world: int, cases: list[dict], timeout: float = 240.0) -> list[list[str]]:
    """Run `cases` (from `cp_case`) on `world` fresh gloo processes (one spawn), bounded by `timeout`
    seconds (then every child is killed); returns each case's problems."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(["torch", "torch.distributed", "sparse_attn.distributed"])
        procs = mp.start_processes(
            _cp_worker,
            args=(world, f"{tmp}/store", cases, tmp),
            nprocs=world,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        failure = None
        try:
            while not procs.join(timeout=1.0):
                if time.monotonic() > deadline:
                    failure = f"the {world} processes did not finish within {timeout:.0f} s"
                    break
        except Exception as e:  # noqa: BLE001 - a child's crash
            failure = f"a process failed: {e}"
        finally:
            for p in procs.processes:
                if p.is_alive():
                    p.kill()
                p.join()
        if failure:
            return [[failure] for _ in cases]
        per_rank = [torch.load(f"{tmp}/results.{r}.pt") for r in range(world)]
    problems = []
    for i, c in enumerate(cases):
        got = [per_rank[r][i] if i < len(per_rank[r]) else {"error": "no result"} for r in range(world)]
        errors = {r: g["error"] for r, g in enumerate(got) if "error" in g}
        if c["unequal"]:
            same = len(errors) == world and len(set(errors.values())) == 1
            ok = same and "same shard shapes" in errors[0]
            problems.append([] if ok else [f"unequal shards: ranks raised {errors}"])
        elif errors:
            problems.append([f"rank {r}: {e}" for r, e in errors.items()])
        else:
            problems.append(_compare_cp(c, got, world))
    return problems


def _compare_cp(c: dict, got: list[dict], world: int) -> list[str]:
    """Problems of every rank's rows against the whole-sequence reference."""
    from sparse_attn.distributed import shard_sequence

    q, k, v = _cp_inputs(c)
    pattern = c["pattern"]
    truth = _results(lambda *t: attention_reference(*t[:3], pattern), q, k, v, None, torch.float64)
    plain = _results(lambda *t: attention_reference(*t[:3], pattern), q, k, v, None, c["dtype"])
    problems = []
    for r in range(world):
        rows = {n: shard_sequence(t, r, world, order=c["order"]) for n, t in truth.items()}
        rows_plain = {n: shard_sequence(t, r, world, order=c["order"]) for n, t in plain.items()}
        problems += [f"rank {r}: {p}" for p in _check(got[r], rows, rows_plain, c["dtype"])]
    return problems


# -- driver --------------------------------------------------------------------------------------------------
def run_one(kind: str, seed: int) -> tuple[str, list[str]]:
    """(description, problems) of one case; an exception other than a clean ValueError/TypeError is one."""
    c = attention_case(seed) if kind == "attention" else varlen_case(seed)
    try:
        problems = run_attention_case(c) if kind == "attention" else run_varlen_case(c)
    except (ValueError, TypeError) as e:
        # A combination the API refuses (e.g. a per-head topk among documents) must say so clearly.
        problems = [] if _clean_refusal(e) else [f"unclear {type(e).__name__}: {e}"]
    except Exception as e:  # noqa: BLE001 - every crash is a finding
        problems = [f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"]
    return c["describe"], problems


def _clean_refusal(e: Exception) -> bool:
    text = str(e)
    return any(word in text for word in ("must", "cannot", "expected", "at most", "only"))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200, help="attention + varlen cases (3:1)")
    parser.add_argument(
        "--cp-cases", type=int, default=24, help="context-parallel cases, over world sizes 2-4"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="re-run one case, KIND:SEED")
    parser.add_argument("--out", default=str(RESULTS / "fuzz-cpu.json"))
    args = parser.parse_args(argv)
    if args.only:
        kind, seed = args.only.split(":")
        if kind == "cp":
            world, seed = (int(x) for x in seed.split("/"))
            print(cp_case(seed, world)["describe"], run_cp_cases(world, [cp_case(seed, world)]))
        else:
            print(*run_one(kind, int(seed)), sep="\n")
        return {}
    start = time.perf_counter()
    counts = {kind: {"cases": 0, "failures": 0} for kind in KINDS}
    failures = []
    for i in range(args.cases):
        kind = "varlen" if i % 4 == 3 else "attention"
        seed = args.seed * 1_000_003 + i
        describe, problems = run_one(kind, seed)
        counts[kind]["cases"] += 1
        if problems:
            counts[kind]["failures"] += 1
            failures.append({"kind": kind, "seed": seed, "case": describe, "problems": problems[:4]})
            print(
                f"FAIL {kind}:{seed} {describe}\n    " + "\n    ".join(p[:300] for p in problems[:4]),
                flush=True,
            )
        if (i + 1) % 25 == 0:
            print(
                f"{i + 1}/{args.cases} cases, {len(failures)} failures, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    per_world = {
        w: [args.seed * 1_000_003 + 500_000 + i for i in range(args.cp_cases) if 2 + i % 3 == w]
        for w in (2, 3, 4)
    }
    for world, seeds in per_world.items():
        if not seeds:
            continue
        results = run_cp_cases(world, [cp_case(seed, world) for seed in seeds])
        for seed, problems in zip(seeds, results, strict=True):
            counts["cp"]["cases"] += 1
            if problems:
                counts["cp"]["failures"] += 1
                describe = cp_case(seed, world)["describe"]
                failures.append(
                    {"kind": "cp", "seed": f"{world}/{seed}", "case": describe, "problems": problems[:4]}
                )
                print(
                    f"FAIL cp:{world}/{seed} {describe}\n    " + "\n    ".join(p[:300] for p in problems[:4]),
                    flush=True,
                )
        print(
            f"context parallelism, {world} ranks: {len(seeds)} cases done, {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    summary = {
        "cpu": _cpu_name(), "torch": torch.__version__, "seed": args.seed,
        "command": "python bench/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": round(time.perf_counter() - start, 1), "counts": counts, "failures": failures,
    }  # fmt: skip
    total = sum(c["cases"] for c in counts.values())
    print(f"{total} cases, {len(failures)} failures ({json.dumps(counts)}) in {summary['seconds']} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


if __name__ == "__main__":
    main()
