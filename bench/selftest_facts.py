"""The self-test's facts table: what the first GPU run must tell, in one table with the device.

Read from the parts' reports (bench/selftest.py runs them): the attention kernel each
layer kind ran with in the compiled d12 step (attention.RAN, what ran rather than what was
chosen), host-device syncs per training step (counted under `set_sync_debug_mode("warn")`), the
eager step's reserved peak against what discovery's memory line (fixed + batch × per sample,
fitted to its probes) predicts for that batch, tokens/s and MFU of the compiled step, and decode
tokens/s at batch 1 with and without the CUDA graph. A fact whose part did not run says so.
"""
from __future__ import annotations

GIB, GB = 2**30, 1e9


def _figures(parts: dict, name: str) -> dict:
    return parts.get(name, {}).get("figures") or {}


def _missing(parts: dict, name: str) -> str:
    entry = parts.get(name, {})
    return f"not measured (part {name}: {entry.get('status', 'not run')})"


def _decode(parts: dict, mode: str) -> float | None:
    for p in _figures(parts, "decode").get("points", []):
        if p.get("batch") == 1 and p.get("mode") == mode:
            return p.get("tok_per_s_median")
    return None


def facts(parts: dict, environment: dict) -> list[tuple[str, str]]:
    """(fact, value) rows, the device first."""
    train = _figures(parts, "train")
    compiled, eager = train.get("compiled", {}), train.get("eager", {})
    rows = [("device", f"{environment.get('device')} (torch {environment.get('torch')}, "
                       f"CUDA {environment.get('cuda_build')})")]
    ran = compiled.get("attention_ran")
    rows.append(("attention kernel per layer kind (compiled step)",
                 ", ".join(f"{k}: {v}" for k, v in sorted(ran.items())) if ran else _missing(parts, "train")))
    syncs = compiled.get("syncs_per_step")
    rows.append(("host-device syncs per training step (compiled)",
                 f"{syncs:g}" if syncs is not None else
                 "not measured (CUDA only)" if train else _missing(parts, "train")))
    rows.append(("reserved peak vs discovery's prediction (eager step)", _reserved(parts, train, eager)))
    if compiled.get("tok_per_s_median") is not None:
        mfu = compiled.get("mfu_datasheet_percent", compiled.get("mfu_percent"))
        rows.append(("compiled d12 step: tok/s, MFU",
                     f"{compiled['tok_per_s_median']:,.0f} tok/s, {mfu:.1f}% MFU"))
    else:
        rows.append(("compiled d12 step: tok/s, MFU", _missing(parts, "train")))
    eager_tok, graph_tok = _decode(parts, "eager"), _decode(parts, "cuda graph")
    graph = f"{graph_tok:,.0f}" if graph_tok is not None else "no CUDA graph run"
    rows.append(("decode tok/s at batch 1: eager, CUDA graph",
                 f"{eager_tok:,.0f}, {graph}" if eager_tok is not None else _missing(parts, "decode")))
    return rows


def _reserved(parts: dict, train: dict, eager: dict) -> str:
    bs = _figures(parts, "batch_size")
    reserved, batch = eager.get("peak_reserved_gb"), train.get("shape", {}).get("batch")
    if reserved is None:
        return "not measured (CUDA only)" if train else _missing(parts, "train")
    fixed, per = bs.get("fixed_gb"), bs.get("per_sample_gb")
    if fixed is None or per is None or batch is None:
        return f"{reserved:.2f} GiB reserved; no prediction ({_missing(parts, 'batch_size')})"
    predicted = (fixed + batch * per) * GB / GIB
    return (f"{reserved:.2f} GiB reserved vs {predicted:.2f} GiB predicted at batch {batch} "
            f"({100 * (reserved / predicted - 1):+.1f}%)")


def markdown(rows: list[tuple[str, str]]) -> list[str]:
    return ["| fact | value |", "|---|---|"] + [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
