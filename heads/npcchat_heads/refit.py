"""`npcchat heads fit`: recalibrate the heads on the GGUF that actually ships.

Quantization moves the `<STATE>` vector, so heads trained on the full-precision model are
refitted on vectors from the bundle's own GGUF, collected through the same one-prefill
path as `talk` (prefill only: no reply is generated). Fitting is numpy (npcchat_heads.fit);
held-out metrics come from the eval metrics code.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npcchat.config import Config
from npcchat.errors import ConfigError
from npcchat.eval import metrics as M
from npcchat.eval.scenarios import Scenario, labelled_flags, read, single_labelled
from npcchat.eval.states import state_vectors
from npcchat.files.atomic import atomic_write
from npcchat.mind.npc import NpcDef
from npcchat.runtime.bundle import Bundle, write_manifest
from npcchat.runtime.bundle import load as load_bundle
from npcchat.runtime.engine import Engine
from npcchat.types import DELTA_NAMES

# (records, tick after each) -> their <STATE> vectors, [n, hidden] float64, in order
StateSource = Callable[[list[Scenario], Callable[[], None]], np.ndarray]


@dataclass(frozen=True)
class Labels:
    delta: np.ndarray  # [n, 2]
    flags: np.ndarray  # [n, F]
    thresholds: np.ndarray  # [n, F]


def load_records(paths: list[Path], strict: bool) -> tuple[list[Scenario], list[str]]:
    records: list[Scenario] = []
    notes: list[str] = []
    for p in paths:
        good, bad = read(p)
        if bad and strict:
            raise ConfigError(f"{bad[0].source}: {bad[0].reason}")
        notes += [f"skipped {b}" for b in bad]
        for sc in good:
            if not single_labelled(sc):
                notes.append(f"skipped {sc.source}: heads fit needs single-turn labelled records")
                continue
            records.append(sc)
    if not records:
        raise ConfigError("no labelled single-turn records to fit on")
    return records, notes


def flag_names(bundle: Bundle, records: list[Scenario], given: list[str] | None) -> tuple[str, ...]:
    if given:
        return tuple(given)
    if bundle.flags:
        return bundle.flags
    names = labelled_flags(records)
    if not names:
        raise ConfigError(
            "the bundle names no flags and the data labels none", hint="pass --flags a,b,c"
        )
    return tuple(names)


def labels(records: list[Scenario], flags: tuple[str, ...]) -> Labels:
    n, f = len(records), len(flags)
    delta, fl, thr = np.full((n, 2), np.nan), np.full((n, f), np.nan), np.full((n, f), np.nan)
    for i, sc in enumerate(records):
        e = sc.turns[0][1]
        assert e is not None
        if e.delta:
            delta[i] = [e.delta[k] for k in DELTA_NAMES]
        for k, name in enumerate(flags):
            if e.flags and name in e.flags:
                fl[i, k] = float(e.flags[name])
            elif e.all_flags_negative_unless_listed:
                fl[i, k] = 0.0
            if e.thresholds and name in e.thresholds:
                thr[i, k] = e.thresholds[name]
    return Labels(delta, fl, thr)


def split(
    n: int, seed: int, test_frac: float, val_frac: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_frac))
    n_val = max(1, round((n - n_test) * val_frac))
    return idx[n_test + n_val :], idx[n_test : n_test + n_val], idx[:n_test]


def held_out(weights: Any, x: np.ndarray, lab: Labels, flags: tuple[str, ...]) -> dict[str, Any]:
    """Metrics of fitted heads on rows they never saw (eval's metric functions)."""
    from npcchat_heads.onnx_builder import reference

    delta, prob, thr = reference(weights, x)
    out: dict[str, Any] = {"n": len(x), "delta": {}, "flags": {}}
    for k, name in enumerate(DELTA_NAMES):
        m = ~np.isnan(lab.delta[:, k])
        out["delta"][name] = {
            "mae": M.mae(list(delta[m, k]), list(lab.delta[m, k])),
            "sign_agreement": M.sign_agreement(list(delta[m, k]), list(lab.delta[m, k])),
        }
    f1s = []
    for k, name in enumerate(flags):
        m = ~np.isnan(lab.flags[:, k])
        if not m.any():
            continue
        true = list(lab.flags[m, k].astype(bool))
        r = M.prf(list(prob[m, k] >= thr[m, k]), true)
        out["flags"][name] = {
            "n": int(m.sum()),
            "positives": int(sum(true)),
            "precision": r.precision,
            "recall": r.recall,
            "f1": r.f1,
            "brier": M.brier(list(prob[m, k]), true),
        }
        f1s.append(r.f1)
    out["flag_f1_macro"] = float(np.mean(f1s)) if f1s else None
    return out


def write_heads(
    bundle: Bundle, target: Path, weights: Any, flags: tuple[str, ...], info: dict[str, Any]
) -> None:
    """New heads and manifest in ``target`` (a copy of the bundle when it differs).

    The heads go to a new file named by their content, and the manifest, written last and
    atomically, switches to it: a crash at any point leaves a bundle whose manifest and
    heads agree (the old pair, or the new one). The old heads file is removed after."""
    from npcchat_heads import onnx_builder

    in_place = target.resolve() == bundle.root.resolve()
    if not in_place:
        if target.exists():
            raise ConfigError(f"--out {target}: already exists; npcchat never overwrites it")
        shutil.copytree(bundle.root, target)
    data = onnx_builder.build(weights, list(flags))
    name = f"heads-{hashlib.sha256(data).hexdigest()[:12]}.onnx"
    atomic_write(target / name, data)
    old = bundle.heads.name if bundle.heads is not None else None
    keep = {
        k: v
        for k, v in bundle.manifest.items()
        if k not in ("format", "format_version", "name", "model", "heads", "prompt")
    }
    keep["heads_fit"] = info
    write_manifest(
        target,
        name=bundle.name,
        gguf=bundle.manifest["model"]["file"],
        heads=name,
        template=bundle.template,
        flags=list(flags),
        hidden_size=bundle.hidden_size,
        quant=bundle.quant,
        extra=keep,
    )
    if old is not None and old != name:
        (target / old).unlink(missing_ok=True)  # the manifest no longer names it


def fit_bundle(
    bundle_dir: Path,
    data: list[Path],
    out: Path | None,
    cfg: Config,
    seed: int = 0,
    l2: float = 1.0,
    test_frac: float = 0.2,
    val_frac: float = 0.2,
    flags_given: list[str] | None = None,
    strict: bool = False,
    progress: Callable[[int, int], None] | None = None,
    vectors: StateSource | None = None,
    scenarios: list[Scenario] | None = None,
    npcs: Mapping[str, NpcDef] | None = None,
) -> dict[str, Any]:
    """Fit the heads of ``bundle_dir`` on ``data`` and write them (``out``: into a copy).
    ``vectors``: where the `<STATE>` vectors come from (None: an engine in this process;
    ``npcchat heads fit --ray`` passes Ray workers, which compute the very same vectors).
    ``scenarios``: the records themselves, read from ``data`` by the caller (``npcchat
    train`` fits on the ones it trained on). ``npcs``: NPC files by id, applied to the
    records that name them as eval applies them (a record's ``npc_file`` always is)."""
    from npcchat_heads.fit import FitData, fit_heads

    bundle = load_bundle(bundle_dir)
    if scenarios is None:
        records, notes = load_records(data, strict)
    else:  # already read (and chosen) by the caller; ``data`` names their files
        records, notes = [sc for sc in scenarios if single_labelled(sc)], []
        if not records:
            raise ConfigError("no labelled single-turn records to fit on")
    flags = flag_names(bundle, records, flags_given)
    lab = labels(records, flags)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], len(records))

    if vectors is None:
        with Engine.load(bundle, cfg) as engine:
            x = state_vectors(engine, records, tick, npcs)
    else:
        x = vectors(records, tick)
    tr, va, te = split(len(records), seed, test_frac, val_frac)

    def part(ix: np.ndarray) -> FitData:
        return FitData(x[ix], lab.delta[ix], lab.flags[ix], lab.thresholds[ix])

    weights, how = fit_heads(part(tr), part(va), l2)
    test_lab = Labels(lab.delta[te], lab.flags[te], lab.thresholds[te])
    metrics = held_out(weights, x[te], test_lab, flags)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in data)).hexdigest()
    info = {
        "data_sha256": digest,
        "records": len(records),
        "train": len(tr),
        "validation": len(va),
        "test": len(te),
        "seed": seed,
        "l2": l2,
        "flag_f1_macro_test": metrics["flag_f1_macro"],
    }
    target = out or bundle.root
    write_heads(bundle, target, weights, flags, info)
    return {
        "bundle": str(target),
        "flags": list(flags),
        "records": len(records),
        "train": len(tr),
        "validation": len(va),
        "test": len(te),
        "thresholds": {flags[int(k)]: v for k, v in how.items()},
        "held_out": metrics,
        "notes": notes,
    }
