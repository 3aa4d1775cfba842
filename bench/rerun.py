"""Rerun a recorded row from its stored config, or check which rows this version still builds.

    python -m bench.rerun RUN_ID [--results DIR] [--out DIR] [--threads N] [--device D]
    python -m bench.rerun --check [--results DIR]

Every row stores ``config``: the config its hash covers (``bench.config.hashed_config``). A rerun
rebuilds that config with this version of the code, refuses when it no longer hashes to the row's
``config_hash`` (a key was added, removed or changed since the row was computed; the error names
the keys and the row's ``git_sha``), runs it into ``--out`` and prints the recorded and the new
metrics side by side. Rows repeat exactly only on the hardware and thread count that computed them
(the row's ``hardware`` and ``threads``; bf16 results differ between CPUs), so a rerun elsewhere
says so beside its numbers.

``--check`` runs nothing: it lists the rows whose stored config no longer builds to their hash
and the rows that predate stored configs (their hash is all that records their config).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any

import pandas as pd

from bench.config import (
    RunConfig,
    config_diff,
    config_hash,
    from_dict,
    hash_of,
    hashed_config,
    rebuild_diff,
)
from bench.errors import BenchError
from bench.rows import load_results
from bench.run import hardware, native_bf16, resolve_device, run_and_record

COMPARED = ["ba", "ba_nt", "asr", "ra", "iso_precision", "iso_recall", "n_suspects"]


def stored_config(row: pd.Series) -> dict | None:
    """The row's stored config, or None for a row that predates stored configs."""
    raw = row.get("config")
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str) or not raw.strip():
        return None
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise BenchError(f"row {row.run_id}: its config is not valid JSON ({e}); the row's "
                         f"file or runs.csv line was edited by hand") from e
    return cfg if isinstance(cfg, dict) else None


def rebuild(row: pd.Series, where: dict | None = None) -> RunConfig:
    """The row's ``RunConfig`` as this version builds it, with ``where`` (results_dir, device,
    threads, …) added; raises ``BenchError`` unless it hashes to the row's ``config_hash``."""
    stored = stored_config(row)
    sha = row.get("git_sha") or "unknown"
    if stored is None:
        raise BenchError(f"row {row.run_id} predates stored configs: only its hash "
                         f"{row.config_hash} records its config; compose it with python -m bench "
                         f"and compare the run id, or check out git {sha} to rerun it")
    if hash_of(stored) != row.config_hash:
        raise BenchError(f"row {row.run_id}: its stored config hashes to {hash_of(stored)}, not "
                         f"{row.config_hash}; the row was edited by hand")
    try:
        cfg = from_dict(stored | (where or {}))
    except BenchError as e:
        raise BenchError(f"row {row.run_id} no longer builds with this version ({e}); check "
                         f"out git {sha} to rerun it") from e
    if config_hash(cfg) != row.config_hash:
        diff = config_diff(stored, hashed_config(cfg))
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise BenchError(f"row {row.run_id}: this version builds its config differently "
                         f"({shown}); check out git {sha} to rerun it exactly")
    return cfg


def find_row(rows: pd.DataFrame, run_id: str, results: str) -> pd.Series:
    hit = rows[rows.run_id == run_id]
    if hit.empty:
        near = [r for r in rows.run_id if run_id in r][:5]
        hint = f"; did you mean {', '.join(near)}" if near else ""
        raise BenchError(f"no row {run_id} in {results}{hint} (run ids are in its runs.csv)")
    return hit.iloc[0]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(v: Any) -> str:
    return "-" if _missing(v) else f"{float(v):.4f}".rstrip("0").rstrip(".")


def _same(a: Any, b: Any) -> bool:
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    return float(a) == float(b)


def compare(old: pd.Series | dict, new: dict) -> tuple[list[str], bool]:
    """Lines of the recorded against the new metrics, and whether all are equal."""
    lines, same = [f"{'':14s} {'recorded':>10s} {'rerun':>10s}"], True
    for k in COMPARED:
        a, b = old.get(k), new.get(k)
        eq = _same(a, b)
        same &= eq
        lines.append(f"{k:14s} {_fmt(a):>10s} {_fmt(b):>10s}{'' if eq else '  differs'}")
    return lines, same


def check(rows: pd.DataFrame) -> list[str]:
    """One line per row this version cannot rebuild (its run id, the row's git sha and the keys
    that differ), after a count."""
    ok, stale, bare, broken = 0, [], 0, []
    for _, row in rows.iterrows():
        stored = stored_config(row)
        if stored is None:
            bare += 1
            continue
        try:
            rebuild(row)
            ok += 1
        except BenchError as e:
            try:
                diff = rebuild_diff(stored)
            except BenchError:
                broken.append(f"- {row.run_id}: {e}")
                continue
            stale.append(f"- {row.run_id} (git {row.get('git_sha')}): {', '.join(diff)}")
    head = (f"{len(rows)} rows: {ok} rebuild to their config hash, {len(stale) + len(broken)} "
            f"do not (keys this version adds +, drops - or changes), {bare} predate stored "
            "configs (only their hash records the config)")
    return [head, *stale, *broken]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rerun", description=__doc__.split("\n")[0])
    p.add_argument("run_id", nargs="?", help="the row to rerun (its run_id)")
    p.add_argument("--results", default="results/fashion_mnist",
                   help="results folder holding the row (default: results/fashion_mnist)")
    p.add_argument("--out", default="runs/rerun", help="where the rerun writes its row")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the row's; rows repeat only on the same count)")
    p.add_argument("--device", default="auto")
    p.add_argument("--check", action="store_true", help="list rows this version cannot rebuild")
    a = p.parse_args(argv)
    try:
        rows = load_results(a.results)
        if rows.empty:
            raise BenchError(f"no rows in {a.results} (is it a results folder?)")
        if a.check:
            print("\n".join(check(rows)))
            return 0
        if not a.run_id:
            raise BenchError("name a run id to rerun, or pass --check")
        row = find_row(rows, a.run_id, a.results)
        threads = a.threads if a.threads is not None else (
            int(row.threads) if pd.notna(row.get("threads")) else None)
        cfg = rebuild(row, {"results_dir": a.out, "device": a.device, "threads": threads,
                            "force": True})
        device = resolve_device(a.device)
        if cfg.amp is True and not native_bf16(device):
            sys.stderr.write(f"note: the row trained in bf16 and {hardware(device)} has no native "
                             "bf16, so this rerun emulates it (about ten times slower)\n")
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
        new = run_and_record(cfg)
        if new.get("status") != "ok":
            raise BenchError(f"the rerun failed: {new.get('error')}")
        lines, same = compare(row, new)
        here, was = hardware(device), row.get("hardware")
        was = was if isinstance(was, str) else "unrecorded hardware"
        old_threads = int(row.threads) if pd.notna(row.get("threads")) else None
        print(f"{a.run_id}: recorded on {was} with {old_threads} thread(s), rerun on {here} "
              f"with {new.get('threads')}")
        print("\n".join(lines))
        print("identical" if same else "differs" + (
            "" if (here, new.get("threads")) == (was, old_threads)
            else " (other hardware or thread count: bf16 rows differ between those)"))
        return 0
    except BenchError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
