"""One run = one cell of the grid = one row: load → poison → defend → evaluate → record."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch

import bench
from bench import metrics
from bench.config import RunConfig, config_hash, hashed_config, parse_device, to_dict
from bench.data import ImageSet, load_dataset
from bench.errors import BenchError
from bench.logger import make_logger, tracked
from bench.models import create_model
from bench.poison import PoisonedTrain, PrepareContext, TriggeredTest, clean, poison
from bench.rows import ok_result_exists, read_row, row_path, write_row
from bench.seeding import derive_seed
from bench.stages import StageTimer
from bench.train import Engine, predict
from defenses import DEFENSES, DefenseContext

log = logging.getLogger("bench")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("device=cuda but no CUDA device is visible; use device=cpu or auto")
    return parse_device(name)


def git_sha() -> str:
    """The commit the code ran from, ``+dirty`` when tracked files differ from it (the row then
    cannot be reproduced from that commit alone); ``unknown`` outside a git checkout."""
    where = dict(capture_output=True, text=True, cwd=Path(bench.__file__).parent, timeout=5)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **where).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], **where).returncode == 1
        return sha + "+dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_flags() -> list[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty
    where there is no such file (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].split() for ln in f
                         if ln.startswith(("flags", "Features"))), [])
    except OSError:
        return []


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs on native bf16 arithmetic: a CUDA GPU that supports bf16, or a
    CPU with AVX512-BF16, AMX-BF16 (x86) or the Arm BF16 extension. Elsewhere oneDNN emulates
    bf16, and training is several times slower than in fp32 (a small CNN on an AVX2 CPU: 162
    against 1688 images/s, ``benchmarks/throughput.py``)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(cpu_flags()))


def resolve_amp(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``amp=auto`` replaced by what it means on this machine: bf16 autocast where
    ``native_bf16``, fp32 elsewhere. The config hash is taken after this, so a row says which
    precision computed it, and an ``auto`` run on a bf16 machine has the hash of ``amp=true``."""
    if cfg.amp != "auto":
        return cfg
    device = resolve_device(cfg.device)
    amp = native_bf16(device)
    if not amp:
        log.info("amp=auto: no native bf16 on %s (%s), training in fp32", device,
                 hardware(device))
    return replace(cfg, amp=amp)


def hardware(device: torch.device) -> str:
    """What computed the row: the GPU's name, or the CPU's vector ISA as PyTorch sees it plus
    the bf16 extensions oneDNN uses (``avx512_bf16``, ``amx_bf16``) and any
    ``ONEDNN_MAX_CPU_ISA`` cap. bf16 results differ between ISAs (e.g. AMX and AVX-512 machines
    give different rows for the same config and seed), so a row says which one it came from."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    flags = cpu_flags()
    parts = [torch.backends.cpu.get_cpu_capability()]
    parts += [fl for fl in ("avx512_bf16", "amx_bf16", "bf16") if fl in flags]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return " ".join(parts) + (f" (ONEDNN_MAX_CPU_ISA={cap})" if cap else "")


def run_id(cfg: RunConfig) -> str:
    attack = cfg.attack.name if cfg.attack else "none"
    return (f"{cfg.dataset.name}-{cfg.model.name.replace('/', '_')}-{attack}-"
            f"{cfg.defense.label}-s{cfg.seed}-{config_hash(cfg)}")


def identity(cfg: RunConfig) -> dict:
    a = cfg.attack
    return {"run_id": run_id(cfg), "dataset": cfg.dataset.name, "model": cfg.model.name,
            "attack": a.name if a else "none", "defense": cfg.defense.label,
            "poison_rate": a.poison_rate if a else 0.0, "target": a.target if a else None,
            "label_mode": a.label_mode if a else None, "seed": cfg.seed,
            "config_hash": config_hash(cfg), "git_sha": git_sha(), "version": bench.__version__,
            "config": hashed_config(cfg)}


def excluded_target(cfg: RunConfig) -> int | None:
    """The class BA_nt leaves out: the target of an all-to-one or clean-label attack."""
    a = cfg.attack
    return a.target if a is not None and a.label_mode != "all2all" else None


def prepare(cfg: RunConfig) -> tuple[PoisonedTrain, ImageSet, TriggeredTest | None]:
    """Load the dataset and poison it (bad input raises ``BenchError`` before any training)."""
    d = cfg.dataset
    train, test = load_dataset(d.name, data_root=cfg.data_root, full=d.full, download=d.download,
                               image_size=d.image_size, synthetic=d.synthetic)
    if d.limit_train is not None:
        train = train.subset(torch.arange(min(d.limit_train, len(train))))
    if d.limit_test is not None:
        test = test.subset(torch.arange(min(d.limit_test, len(test))))
    create_model(cfg.model.name, train.num_classes, train.x.shape[1], **cfg.model.kwargs)
    if cfg.attack is None:
        return clean(train), test, None
    device = resolve_device(cfg.device)
    ctx = PrepareContext(seed=cfg.seed, device=str(device), amp=cfg.amp,
                         channels_last=cfg.channels_last,
                         cache_dir=str(Path(cfg.results_dir) / "cache"), progress=cfg.progress,
                         hardware=hardware(device))
    ptrain, triggered = poison(train, test, cfg.attack, cfg.seed, ctx)
    return ptrain, test, triggered


def to_device(s: ImageSet, device: torch.device) -> ImageSet:
    return replace(s, x=s.x.to(device), y=s.y.to(device))


def evaluate(model, test: ImageSet, triggered: TriggeredTest | None, eng: Engine,
             normalize: bool | None = None, target: int | None = None) -> dict:
    """BA, BA_nt (without the class ``target``; see ``bench.metrics``), ASR, RA and, as
    ``clean_acc_class``, the clean accuracy of every class."""
    pred = predict(model, test.x.to(eng.device), eng, normalize=normalize).argmax(1)
    out = {"ba": metrics.accuracy(pred, test.y),
           "ba_nt": metrics.non_target_accuracy(pred, test.y, target),
           "asr": math.nan, "ra": math.nan,
           "clean_acc_class": metrics.class_accuracies(pred, test.y, test.num_classes)}
    if triggered is not None:
        tpred = predict(model, triggered.x.to(eng.device), eng, normalize=normalize).argmax(1)
        out["asr"] = metrics.attack_success_rate(tpred, triggered.y)
        out["ra"] = metrics.robust_accuracy(tpred, triggered.y_true)
    return out


def deterministic_cuda(device: torch.device) -> None:
    """On CUDA, ask for deterministic kernels (cuDNN without autotuning, deterministic cuBLAS
    workspaces; a warning, not an error, where an op has no deterministic version), so that a
    run repeats for a given config, seed and GPU. The CPU kernels are deterministic already and
    are left as they are."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def run(cfg: RunConfig) -> dict:
    """Run one configuration end to end and return its row (not yet written)."""
    start = time.perf_counter()
    cfg = resolve_amp(cfg)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    deterministic_cuda(device)
    torch.manual_seed(cfg.seed)  # library code uses explicit generators; this pins the rest
    timer = StageTimer(device)
    with timer("poison"):
        ptrain, test, triggered = prepare(cfg)
    data = ptrain.data
    eng = Engine(device, data.mean, data.std, amp=cfg.amp, channels_last=cfg.channels_last,
                 normalize=cfg.train.normalize, progress=cfg.progress,
                 eval_batch_size=cfg.train.eval_batch_size)

    def make_model():
        with torch.random.fork_rng(devices=[]):  # same initial weights for every defense
            torch.manual_seed(derive_seed(cfg.seed, "init"))
            return create_model(cfg.model.name, data.num_classes, data.x.shape[1],
                                **cfg.model.kwargs)

    ctx = DefenseContext(eng, cfg.train, make_model, cfg.seed, timer)
    result = DEFENSES.get(cfg.defense.name).obj(to_device(data, device), cfg.defense.params, ctx)
    with timer("evaluate"):
        scores = evaluate(result.model, test, triggered, eng, result.normalize,
                          target=excluded_target(cfg))
    per_class = scores.pop("clean_acc_class")
    row = identity(cfg) | scores
    row["n_poisoned"] = ptrain.n_poisoned
    flagged = {k: v.cpu().bool() for k, v in result.suspects.items()}
    final = (flagged[result.headline] if result.headline  # else the last stage's suspects
             else next(reversed(flagged.values()), None))
    row["iso_precision"], row["iso_recall"] = (metrics.isolation_quality(final, ptrain.kind)
                                               if final is not None else (math.nan, math.nan))
    row["n_suspects"] = int(final.sum()) if final is not None else None
    extra = dict(result.extra) | {"clean_acc_class": per_class}
    for stage, mask in flagged.items():
        p, r = metrics.isolation_quality(mask, ptrain.kind)
        extra |= {f"{stage}_iso_precision": p, f"{stage}_iso_recall": r,
                  f"{stage}_kept_poison": metrics.kept_poison_fraction(mask, ptrain.kind)}
    row |= {"wall_s": time.perf_counter() - start, "stage_s": timer.seconds,
            "peak_mem_mb": timer.peak_mem_mb, "device": str(device),
            "hardware": hardware(device), "threads": torch.get_num_threads(), "status": "ok",
            "error": None,
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"), "extra": extra}
    return row


def finished_row(cfg: RunConfig) -> dict | None:
    """The ``ok`` row of an earlier identical run, if any (for resumable sweeps)."""
    path = row_path(cfg.results_dir, run_id(cfg))
    row = read_row(path) if path.exists() else None
    return row if row and row.get("status") == "ok" else None


def run_and_record(cfg: RunConfig) -> dict:
    """Run (or skip, if already done) and write the row. Bad input raises ``BenchError`` and
    writes nothing; any other failure is written as a ``failed`` row and returned."""
    cfg = resolve_amp(cfg)
    if not cfg.force and (done := finished_row(cfg)) is not None:
        log.info("skipping %s: already done (force=true reruns it)", done["run_id"])
        return done
    start = time.perf_counter()
    track = tracked(make_logger(cfg.logger, cfg.results_dir), run_id(cfg), to_dict(cfg))  # logger
    try:
        with track:  # logger: forwards fit's epochs while the run runs
            row = run(cfg)
    except BenchError:
        raise
    except Exception as e:  # noqa: BLE001 — a failed job is a row, the sweep goes on
        log.exception("run failed")
        row = identity(cfg) | {"status": "failed", "error": f"{type(e).__name__}: {e}",
                               "wall_s": time.perf_counter() - start,
                               "timestamp": datetime.now(UTC).isoformat(timespec="seconds")}
        if ok_result_exists(cfg.results_dir, row["run_id"]):
            row["run_id"] += "-failed"  # a failed rerun (force=true) never replaces an ok row
    write_row(cfg.results_dir, row)
    track.finish(row)  # logger: after the row is safe
    return row


def summary(row: dict) -> str:
    def f(v):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    head = f"{row['dataset']} {row['model']} attack={row['attack']} defense={row['defense']}"
    if row["status"] != "ok":
        return f"{head} seed={row['seed']}: FAILED {row['error']}"
    return (f"{head} seed={row['seed']}: BA {f(row['ba'])} | ASR {f(row['asr'])} | "
            f"RA {f(row['ra'])} | {row['wall_s']:.1f}s")
