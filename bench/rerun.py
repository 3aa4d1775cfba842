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
import logging
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from bench.config import RunConfig, config_hash, from_dict, hash_of, rebuild_diff
from bench.errors import BenchError
from bench.rows import load_results, read_json_object
from bench.run import hardware, native_bf16, resolve_device, run_and_record

COMPARED = ["ba", "ba_nt", "asr", "ra", "iso_precision", "iso_recall", "n_suspects"]


def _sha(row: pd.Series) -> str:
    sha = row.get("git_sha")
    return sha if isinstance(sha, str) and sha else "unknown"


def stored_config(row: pd.Series) -> dict | None:
    """The row's stored config, or None for a row that predates stored configs."""
    try:
        return read_json_object(row.get("config"))
    except ValueError as e:  # not valid JSON (…), or not a JSON object
        raise BenchError(f"row {row.run_id}: its config is {e}; the row's file or runs.csv line "
                         "was edited by hand") from e


class Status(NamedTuple):
    """A row's stored config under this version (``classify``)."""

    kind: str  # ok | bare | edited | stale | unbuildable
    detail: str = ""  # why, for edited and unbuildable
    keys: tuple[str, ...] = ()  # stale: the keys this version builds differently (config_diff)
    config: dict | None = None  # the stored config, where readable


def classify(row: pd.Series) -> Status:
    """How this version treats a row's stored config: ``ok`` (rebuilds to its hash), ``bare``
    (predates stored configs), ``edited`` (unreadable, or not the config of its hash),
    ``stale`` (builds differently) or ``unbuildable``."""
    try:
        stored = stored_config(row)
    except BenchError as e:
        return Status("edited", str(e))
    if stored is None:
        return Status("bare")
    if hash_of(stored) != str(row.config_hash):
        return Status("edited", f"row {row.run_id}: its stored config hashes to "
                                f"{hash_of(stored)}, not {row.config_hash}; the row was edited "
                                "by hand", config=stored)
    try:
        diff = rebuild_diff(stored)
    except (BenchError, TypeError) as e:
        return Status("unbuildable", str(e).splitlines()[0][:200], config=stored)
    return Status("stale" if diff else "ok", keys=tuple(diff), config=stored)


def rebuild(row: pd.Series, where: dict | None = None) -> RunConfig:
    """The row's ``RunConfig`` as this version builds it, with ``where`` (results_dir, device,
    threads, …) added; raises ``BenchError`` unless it hashes to the row's ``config_hash``."""
    st, sha = classify(row), _sha(row)
    if st.kind == "bare":
        raise BenchError(f"row {row.run_id} predates stored configs: only its hash "
                         f"{row.config_hash} records its config; compose it with python -m bench "
                         f"and compare the run id, or check out git {sha} to rerun it")
    if st.kind == "edited":
        raise BenchError(st.detail)
    if st.kind == "unbuildable":
        raise BenchError(f"row {row.run_id} no longer builds with this version ({st.detail}); "
                         f"check out git {sha} to rerun it")
    if st.kind == "stale":
        shown = ", ".join(st.keys[:6]) + (f" and {len(st.keys) - 6} more"
                                          if len(st.keys) > 6 else "")
        raise BenchError(f"row {row.run_id}: this version builds its config differently "
                         f"({shown}); check out git {sha} to rerun it exactly")
    cfg = from_dict(st.config | (where or {}))
    assert config_hash(cfg) == row.config_hash  # classify said it rebuilds
    return cfg


def find_row(rows: pd.DataFrame, run_id: str, results: str) -> pd.Series:
    hit = rows[rows.run_id == run_id]
    if hit.empty:
        near = [r for r in rows.run_id if run_id in r][:5]
        hint = f"; did you mean {', '.join(near)}" if near else ""
        raise BenchError(f"no row {run_id} in {results}{hint} (run ids are in its runs.csv)")
    return hit.iloc[0]


def _fmt(v: Any) -> str:
    return "-" if pd.isna(v) else f"{float(v):.4f}".rstrip("0").rstrip(".")


def _same(a: Any, b: Any) -> bool:
    if pd.isna(a) or pd.isna(b):
        return pd.isna(a) and pd.isna(b)
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
    """A count, then one line per row this version cannot rebuild (its run id, the row's git sha
    and the keys that differ, or why)."""
    kinds: dict[str, list[str]] = {k: [] for k in ("ok", "bare", "edited", "stale", "unbuildable")}
    for _, row in rows.iterrows():
        st = classify(row)
        kinds[st.kind].append(
            f"- {row.run_id} (git {_sha(row)}): {', '.join(st.keys)}" if st.kind == "stale" else
            f"- {row.run_id} (git {_sha(row)}): no longer builds: {st.detail}"
            if st.kind == "unbuildable" else f"- {st.detail}")
    bad = kinds["stale"] + kinds["unbuildable"] + kinds["edited"]
    head = (f"{len(rows)} rows: {len(kinds['ok'])} rebuild to their config hash, {len(bad)} do "
            f"not (keys this version adds +, drops - or changes), {len(kinds['bare'])} predate "
            "stored configs (only their hash records the config)")
    return [head, *bad]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.rerun", description=__doc__.split("\n")[0])
    p.add_argument("run_id", nargs="?", help="the row to rerun (its run_id)")
    p.add_argument("--results", default="results/fashion_mnist",
                   help="results folder holding the row (default: results/fashion_mnist)")
    p.add_argument("--out", default="runs/rerun",
                   help="where the rerun writes its row (not --results: it would replace it)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the row's; rows repeat only on the same count)")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: the row's)")
    p.add_argument("--data-root", default=None, help="dataset files, as data_root of a run")
    p.add_argument("--check", action="store_true", help="list rows this version cannot rebuild")
    return p


def rerun(row: pd.Series, a: argparse.Namespace) -> None:
    """Rerun ``row`` as ``a`` (the parsed command line) says and print both rows' metrics."""
    old_threads = int(row.threads) if pd.notna(row.get("threads")) else None
    was_device = row.get("device") if isinstance(row.get("device"), str) else "auto"
    device_name = a.device or was_device.split(":")[0]
    cfg = rebuild(row, {"results_dir": a.out, "device": device_name, "force": True,
                        "threads": a.threads if a.threads is not None else old_threads,
                        "data_root": a.data_root})
    device = resolve_device(device_name)
    if cfg.amp is True and not native_bf16(device):
        sys.stderr.write(f"note: the row trained in bf16 and {hardware(device)} has no native "
                         "bf16, so this rerun emulates it (about ten times slower)\n")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    new = run_and_record(cfg)
    if new.get("status") != "ok":
        msg = str(new.get("error") or "").strip().splitlines()
        raise BenchError(f"the rerun failed ({msg[0] if msg else 'no error recorded'}); "
                         f"its row is in {a.out}")
    lines, same = compare(row, new)
    here, was = hardware(device), row.get("hardware")
    was = was if isinstance(was, str) else "unrecorded hardware"
    print(f"{a.run_id}: recorded ({row.get('status')}) on {was} with {old_threads} "
          f"thread(s), rerun on {here} with {new.get('threads')}")
    print("\n".join(lines))
    elsewhere = (here, new.get("threads")) != (was, old_threads)
    print("identical" if same else "differs" + (
        "" if not elsewhere else " (on other hardware or another thread count"
        + (": bf16 results differ between those)" if cfg.amp else ")")))


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        rows = load_results(a.results)
        if rows.empty:
            raise BenchError(f"no rows in {a.results} (is it a results folder?)")
        if a.check:
            print("\n".join(check(rows)))
            return 0
        if not a.run_id:
            raise BenchError("name a run id to rerun, or pass --check")
        if Path(a.out).resolve() == Path(a.results).resolve():
            raise BenchError(f"--out {a.out} is the folder of the recorded row, which the rerun "
                             "would replace; pass another --out")
        rerun(find_row(rows, a.run_id, a.results), a)
        return 0
    except BenchError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
