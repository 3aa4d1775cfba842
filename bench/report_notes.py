"""The notes of ``leaderboard.md`` (``bench.report``): failed runs, superseded rows, cells split
by stored config, lines that mix hardware or CPU thread counts, and rows whose stored config this
version builds differently. Each returns its Markdown lines, empty when there is nothing to say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from bench.rerun import classify
from bench.rows import GROUP, NOT_STORED, main_settings


def _seeds(rows: pd.DataFrame, by_defense: bool) -> str:
    """``seeds 0, 2`` or, per defense, ``none: seed 1; abl: seeds 0, 1``."""
    def seeds(g: pd.DataFrame) -> str:
        s = sorted(pd.to_numeric(g.seed, errors="coerce").dropna().astype(int))
        return f"seed{'s' if len(s) != 1 else ''} {', '.join(map(str, s))}"

    if not by_defense:
        return seeds(rows)
    return "; ".join(f"{d}: {seeds(g)}" for d, g in rows.groupby("defense", sort=True))


def setting_note(rows: pd.DataFrame) -> list[str]:
    """One bullet per cell whose rows ran stored configs that differ in a value other than the
    seed (``bench.rows.config_settings``): the main setting's values and row count under the
    plain name, then every other setting's line and its rows. ``rows`` has the leaderboard's
    attack names (``attack_settings``), not yet ``setting_names``."""
    if rows.empty or "attack_setting" not in rows:
        return []
    main, bullets = main_settings(rows), []
    levels = ((["dataset", "model", "attack", "poison_rate"], "attack_setting", "attack"),
              (GROUP, "defense_setting", "defense"))
    for by, col, name in levels:
        for key, g in rows[rows[col] != ""].groupby(by, dropna=False, sort=True):
            where = " · ".join(map(str, key[:3])) + (f" / {key[3]}" if name == "defense" else "")
            parts = []
            for label, h in g.groupby(col, sort=True):
                line = h[name].iloc[0]
                if main.loc[h.index, col].all():
                    n = len(h)
                    parts.insert(0, f"`{line}` ran {label} ({n} row{'s' if n != 1 else ''})")
                else:
                    parts.append(f"`{line} [{label}]` ({_seeds(h, name == 'attack')})")
            bullets.append(f"- {where} @ {float(key[-1]):g}: " + "; ".join(parts))
    if not bullets:
        return []
    n = len(bullets)
    return [f"{n} cell{'s' if n != 1 else ''} split by stored config (their rows differ in a "
            "config value other than the seed, so each setting is a line of its own, named by "
            "those values unless most of the cell's rows ran it; a key that only some rows "
            f"store splits nothing, and `{NOT_STORED}` marks rows that predate stored "
            "configs):", "", *bullets, ""]


def failed_note(failed: pd.DataFrame) -> list[str]:
    """``N failed runs:`` followed by one ``run_id — error`` bullet per failed row."""
    if failed.empty:
        return []
    lines = [f"{len(failed)} failed run{'s' if len(failed) != 1 else ''}:", ""]
    for rid, err in zip(failed.run_id, failed.error, strict=True):
        msg = str(err).strip().splitlines()[0][:200] if isinstance(err, str) and err else "?"
        lines.append(f"- {rid} — {msg.replace('|', '/')}")
    return [*lines, ""]


def superseded_note(superseded: pd.DataFrame | None) -> list[str]:
    """One bullet per ok row left out because a newer config of its cell, setting and seed
    exists (``bench.rows.latest_per_cell``)."""
    if superseded is None or superseded.empty:
        return []
    lines = [f"{len(superseded)} superseded row{'s' if len(superseded) != 1 else ''} left out "
             "(a newer config of the same cell, setting and seed exists; rerun or delete "
             "them):", ""]
    lines += [f"- {rid}" for rid in superseded.run_id]
    return [*lines, ""]


def _compact_keys(keys: list[str]) -> str:
    """``+a.b.x, +a.b.y`` → ``+a.b.{x, y}``."""
    parents: dict[str, list[str]] = {}
    for k in keys:
        sign, path = (k[0], k[1:]) if k[0] in "+-" else ("", k)
        head, _, leaf = path.rpartition(".")
        parents.setdefault(f"{sign}{head}", []).append(leaf)
    return ", ".join(f"{h}.{{{', '.join(v)}}}" if len(v) > 1 else f"{h}.{v[0]}".lstrip(".")
                     for h, v in parents.items())


def stale_note(ok: pd.DataFrame, results_dir: Path) -> list[str]:
    """Rows of the tables whose stored config this version builds differently (keys added,
    dropped or changed since they ran), grouped by those keys; rows whose stored config cannot
    be trusted; and the count of rows that predate stored configs (``bench.rerun.classify``).
    Such a row measured a config a rerun would not repeat exactly."""
    groups: dict[str, dict[str, list[int]]] = {}
    bare = 0
    for _, row in ok.iterrows():
        st = classify(row)
        if st.kind == "bare":
            bare += 1
            continue
        if st.kind == "ok":
            continue
        key = (_compact_keys(list(st.keys)) if st.kind == "stale" else
               "not buildable by this version" if st.kind == "unbuildable" else
               "stored config edited or unreadable")
        groups.setdefault(key, {}).setdefault(f"{row.attack}/{row.defense}", []).append(
            int(row.seed))
    lines = []
    if groups:
        n = sum(len(seeds) for cells in groups.values() for seeds in cells.values())
        lines += [f"{n} row{'s' if n != 1 else ''} ran under a config this version builds "
                  "differently (+ a key added since, - dropped, else changed); `python -m "
                  f"bench.rerun --check --results {results_dir}` names each row's commit:", ""]
        for key, cells in groups.items():
            lines.append(f"- {key}: " + ", ".join(
                f"{c} (seed{'s' if len(v) > 1 else ''} {', '.join(map(str, sorted(v)))})"
                for c, v in sorted(cells.items())))
        lines += [""]
    if bare:
        lines += [f"{bare} row{'s' if bare != 1 else ''} predate{'s' if bare == 1 else ''} "
                  "stored configs: only the config hash in the run id records what ran.", ""]
    return lines


def _where(ok: pd.DataFrame) -> pd.DataFrame:
    """Per row: ``hw`` (the recorded hardware, else missing), ``threads`` (the recorded thread count
    on a CPU, else NaN) and ``text``, where the row was computed in words."""
    def col(name: str) -> pd.Series:
        return ok[name] if name in ok else pd.Series(None, index=ok.index, dtype=object)

    hw = col("hardware").map(lambda v: v.strip() if isinstance(v, str) and v.strip() else None)
    on_cpu = col("device").astype(str).isin(["cpu", "nan", "None", ""])
    threads = pd.to_numeric(col("threads"), errors="coerce").where(on_cpu)

    def text(h: Any, t: float, cpu: bool) -> str:
        out = h if isinstance(h, str) else "unrecorded hardware"
        if cpu:
            out += (", default threads" if pd.isna(t)
                    else f", {int(t)} thread{'s' if int(t) != 1 else ''}")
        return out

    return pd.DataFrame({"hw": hw, "threads": threads, "text": list(map(
        text, hw, threads, on_cpu))}, index=ok.index)


def mixed_compute_note(ok: pd.DataFrame) -> list[str]:
    """One bullet per leaderboard line whose rows were computed on more than one hardware or CPU
    thread count: bf16 numerics (and so BA/ASR) differ between them, so its mean mixes two
    numerics. A row that did not record its hardware (older rows) or thread count differs from
    none. ``ok`` has the leaderboard's attack names (``attack_settings``)."""
    if ok.empty:
        return []
    where = _where(ok)
    bullets = []
    for key, g in where.groupby([ok[c] for c in GROUP], dropna=False, sort=True):
        if g.hw.nunique() < 2 and g.threads.nunique() < 2:
            continue
        parts = []
        for text, h in g.groupby("text", sort=True):
            seeds = sorted(pd.to_numeric(ok.seed[h.index], errors="coerce").dropna().astype(int))
            parts.append(f"{text} (seed{'s' if len(seeds) != 1 else ''} "
                         f"{', '.join(map(str, seeds))})")
        dataset, model, attack, defense, rate = key
        bullets.append(f"- {dataset} · {model} · {attack} / {defense} @ {float(rate):g}: "
                       + "; ".join(parts))
    if not bullets:
        return []
    n = len(bullets)
    return [f"{n} line{'s' if n != 1 else ''} mix{'es' if n == 1 else ''} rows computed on "
            "different hardware or CPU thread counts (bf16 results differ between them):", "",
            *bullets, ""]
