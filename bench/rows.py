"""Results: one ``row.json`` per run, written atomically, merged into a tidy ``runs.csv``.

A row has fixed columns (identity, metrics, cost, outcome). ``collect`` is idempotent: it reads
every row file under ``<results_dir>/rows`` and rewrites ``runs.csv`` atomically, so parallel jobs
and interrupted sweeps never leave a half-written table. Row files are not committed, so a fresh
clone of a results folder holds only its ``runs.csv``: ``load_results`` (what ``collect`` and the
reports read) keeps every line of ``runs.csv`` whose run id has no readable row file, and a row
file replaces the line of its run id. Results already written are never lost by running more jobs
into the same folder; to drop a row, delete its file and its line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

log = logging.getLogger("bench")

IDENTITY = ["run_id", "dataset", "model", "attack", "defense", "poison_rate", "n_poisoned",
            "target", "label_mode", "seed", "config_hash", "git_sha", "version"]
METRICS = ["ba", "ba_nt", "asr", "ra", "iso_precision", "iso_recall", "n_suspects"]
COST = ["wall_s", "stage_s", "peak_mem_mb", "device", "hardware", "threads"]
OUTCOME = ["status", "error", "timestamp", "extra"]
# the config the hash covers (``bench.config.hashed_config``), JSON: what ``bench.rerun`` rebuilds
CONFIG = ["config"]
COLUMNS = IDENTITY + METRICS + COST + OUTCOME + CONFIG


@contextlib.contextmanager
def file_lock(path: Path | None):
    """Hold an exclusive ``flock`` on ``<path>.lock`` (parallel jobs of a sweep take turns).

    The lock dies with its process, so a killed job never leaves it held; lock files are never
    deleted (unlinking them would race). Without ``fcntl`` or a writable folder: no lock.
    """
    if path is None or fcntl is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_name(path.name + ".lock"), "a+")  # noqa: SIM115
    except OSError as e:
        log.warning("cannot lock %s (%s); continuing without a lock", path, e)
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write(path: Path, content: str | bytes) -> None:
    """Write ``content`` to ``path`` via a temp file in the same folder and ``os.replace``, so
    readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def row_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / "rows" / f"{run_id}.json"


def write_row(results_dir: str | Path, row: dict) -> Path:
    path = row_path(results_dir, row["run_id"])
    atomic_write(path, json.dumps(row, indent=1, sort_keys=False, default=str))
    return path


def read_row(path: Path) -> dict | None:
    """A row, or None (with a warning) when the file is unreadable."""
    try:
        row = json.loads(path.read_text())
        return row if isinstance(row, dict) and "run_id" in row else None
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8
        log.warning("skipping unreadable row %s (%s); delete it to rerun that job", path, e)
        return None


def ok_result_exists(results_dir: str | Path, run_id: str) -> bool:
    """Whether an ``ok`` row of ``run_id`` is on record: its row file, or (no row file) its
    ``runs.csv`` line."""
    path = row_path(results_dir, run_id)
    if path.exists() and (row := read_row(path)) is not None:
        return row.get("status") == "ok"
    old = _csv_rows(Path(results_dir) / "runs.csv")
    return old is not None and bool(((old.run_id == run_id) & (old.status == "ok")).any())


def load_rows(results_dir: str | Path) -> pd.DataFrame:
    files = sorted((Path(results_dir) / "rows").glob("*.json"))
    rows = [r for r in map(read_row, files) if r is not None]
    df = pd.DataFrame(rows, columns=None if rows else COLUMNS)
    for c in ("stage_s", "extra", "config"):
        if c in df:
            df[c] = df[c].map(lambda v: json.dumps(v) if isinstance(v, dict) else v)
    return _tidy(df)


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    """The fixed columns first (missing ones empty), then any others sorted; rows in cell order."""
    for c in COLUMNS:
        if c not in df:
            df[c] = None
    df = df[COLUMNS + sorted(set(df.columns) - set(COLUMNS))]
    keys = ["dataset", "model", "attack", "defense", "poison_rate", "seed", "run_id"]
    return df.sort_values(keys, na_position="first", kind="stable").reset_index(drop=True)


GROUP = ["dataset", "model", "attack", "defense", "poison_rate"]  # one leaderboard line
CELL = ["dataset", "model", "attack", "target", "label_mode", "defense", "poison_rate", "seed"]
# a row's setting (``config_settings``): at the attack level among the rows of its attack
# setting, every defense and seed together; at the defense level among the rows of its cell
SETTING = ["attack_setting", "defense_setting"]
NOT_STORED = "config not stored"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested dict (a stored config's dotted keys)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def read_json_object(raw: Any) -> dict | None:
    """A row's JSON-object cell (``config``, ``extra``, ``stage_s``: a dict, or its JSON), or
    None when it is empty (an older row without it); raises ``ValueError`` (``not valid JSON
    (…)``, ``not a JSON object``) when unreadable."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str) or not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def parse_json_object(raw: Any) -> dict | None:
    """``read_json_object``, or None when the cell is unreadable."""
    try:
        return read_json_object(raw)
    except ValueError:
        return None


def _flat_config(raw: Any) -> dict[str, Any] | None:
    """A row's stored config as dotted keys without ``seed``; None when it has none (older rows)
    or it is unreadable."""
    cfg = parse_json_object(raw)
    return None if cfg is None else {k: v for k, v in flatten(cfg).items() if k != "seed"}


def _same(v: Any) -> str:
    """A comparable form of a config value: 1 and 1.0 alike, lists and tuples alike."""
    def norm(x: Any) -> Any:
        if isinstance(x, int | float) and not isinstance(x, bool):
            return float(x)
        return [norm(y) for y in x] if isinstance(x, list | tuple) else x

    return json.dumps(norm(v), sort_keys=True)


def _labels(configs: list[dict[str, Any] | None]) -> list[str]:
    """Per config of one group, ``key=value, …`` over the keys whose stored values differ within
    the group (``key=?`` where a row does not store the key, ``NOT_STORED`` for a row without a
    stored config); all ``""`` when no stored value differs. A key that only some rows store, with
    one value among them, splits nothing: it was added or dropped between versions of the code
    (``python -m bench.rerun --check`` and the report's stale note list such rows)."""
    stored = [c for c in configs if c is not None]
    keys = sorted({k for c in stored for k in c})
    split = [k for k in keys if len({_same(c[k]) for c in stored if k in c}) > 1]
    if not split:
        return [""] * len(configs)
    return [NOT_STORED if c is None else ", ".join(
        f"{k}={(c[k] if isinstance(c[k], str) else json.dumps(c[k])) if k in c else '?'}"
        for k in split) for c in configs]


def _is_defense_key(key: str) -> bool:
    return key == "defense" or key.startswith("defense.")


def config_settings(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with ``attack_setting`` and ``defense_setting``: where rows that one line would
    average stored configs that differ in a value (not the seed), each row's values of the keys
    that differ (``_labels``), else ``""``. The attack level compares every key but
    ``defense.*`` among the rows of one (dataset, model, attack, target, label mode, poison
    rate), all defenses together, so that a no-defense row and the defended rows it is the
    reference of carry the same label; the defense level compares ``defense.*`` among the rows of
    one cell (``CELL`` without the seed)."""
    configs = (rows["config"] if "config" in rows else pd.Series(None, index=rows.index)
               ).map(_flat_config)

    def level(by: list[str], keep: Any) -> list[str]:
        part = [None if c is None else {k: v for k, v in c.items() if keep(k)} for c in configs]
        out = [""] * len(rows)
        for pos in rows.groupby(by, dropna=False, sort=False).indices.values():
            for i, label in zip(pos, _labels([part[i] for i in pos]), strict=True):
                out[i] = label
        return out

    if rows.empty:
        return rows.assign(attack_setting=pd.Series(dtype=object),
                           defense_setting=pd.Series(dtype=object))
    base = [c for c in CELL if c not in ("defense", "seed")]
    return rows.assign(attack_setting=level(base, lambda k: not _is_defense_key(k)),
                       defense_setting=level(CELL[:-1], _is_defense_key))


def main_settings(rows: pd.DataFrame) -> pd.DataFrame:
    """Per row of ``config_settings``, per level (``SETTING`` columns, booleans): whether it ran
    its group's main setting, the one most of the group's rows ran; every row where the group
    does not split. A tie leaves no main setting, and a row without a stored config is never in
    it."""
    out = pd.DataFrame(True, index=rows.index, columns=SETTING)
    base = [c for c in CELL if c not in ("defense", "seed")]
    for col, by in zip(SETTING, (base, CELL[:-1]), strict=True):
        if rows.empty:
            break
        for pos in rows.groupby(by, dropna=False, sort=False).indices.values():
            labels = rows[col].iloc[pos]
            counts = labels[labels != NOT_STORED].value_counts()
            top = (counts.index[0] if len(counts) == 1 or (len(counts) > 1
                                                           and counts.iloc[0] > counts.iloc[1])
                   else None)
            out.iloc[pos, out.columns.get_loc(col)] = ((labels == "") | (labels == top)).values
    return out


def latest_per_cell(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(kept, superseded)``, both with ``config_settings``'s columns: the newest row of each
    (dataset, model, attack, target, label mode, defense, poison rate, seed) cell and setting,
    and the older rows of the same cell and setting. Two rows share a cell and setting but not a
    run id when the config hash changed in between without a stored value changing (a key added
    or dropped, or a row that predates stored configs), so the older one measured a config that
    no longer exists and must not count as another seed. Rows that differ in target, label mode
    or a stored config value (``dataset.limit_train``, ``train.epochs``, ``amp``, …) are
    different cells."""
    rows = config_settings(rows)
    if rows.empty:
        return rows, rows
    newest_last = rows.sort_values("timestamp", kind="stable", na_position="first")
    old = newest_last.duplicated([*CELL, *SETTING], keep="last")
    return newest_last[~old].sort_index(), newest_last[old].sort_index()


# pandas 3 parses floats exactly by default and deprecates the option pandas 2 needs for it
_EXACT_FLOATS = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}


# identifiers that may look like numbers (a hash of digits, ``80928e890337``) stay text
_TEXT = ("run_id", "config_hash", "git_sha")


def _csv_rows(path: Path) -> pd.DataFrame | None:
    """The rows of an existing ``runs.csv``, floats read back exactly, or None when absent.

    An unreadable file (not a CSV, no ``run_id`` column) is renamed to ``runs.csv.unreadable``
    (``.unreadable.1``, ``.2``, … when that name is taken) with a warning, so the rebuilt table
    never overwrites the only copy of what it held."""
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path, dtype=dict.fromkeys(_TEXT, str), **_EXACT_FLOATS)
        if "run_id" not in df.columns:
            raise ValueError("no run_id column")
        return df
    except (OSError, ValueError, pd.errors.ParserError) as e:
        aside = path.with_name(path.name + ".unreadable")
        n = 1
        while aside.exists():  # an earlier unreadable copy is kept too
            aside, n = path.with_name(f"{path.name}.unreadable.{n}"), n + 1
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.warning("%s is unreadable (%s: %s); kept as %s and rebuilt from the row files",
                    path, type(e).__name__, e, aside.name)
        return None


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """Every row of a results folder: the row files, plus the lines of ``runs.csv`` whose run id
    has no readable row file (a fresh clone of committed results has only ``runs.csv``)."""
    rows = load_rows(results_dir)
    old = _csv_rows(Path(results_dir) / "runs.csv")
    if old is None or old.empty:
        return rows
    old = old[~old.run_id.isin(set(rows.run_id))]
    if old.empty:
        return rows
    return _tidy(pd.concat([rows, old], ignore_index=True) if len(rows) else old)


def collect(results_dir: str | Path) -> Path:
    """Rebuild ``<results_dir>/runs.csv`` from ``load_results`` (the row files and the lines of
    the previous ``runs.csv`` that no row file replaces); returns its path."""
    out = Path(results_dir) / "runs.csv"
    with file_lock(out):  # a job that read the folder earlier must not replace it last
        atomic_write(out, load_results(results_dir).to_csv(index=False))
    return out
