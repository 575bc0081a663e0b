"""The training loop: batches, the multi-task loss, held-out scoring, checkpoints, resume.

Loss per batch: LM loss on the reply tokens only, plus the state loss of
:mod:`npcchat_train.state_heads` on the mean final hidden state at the `<STATE>` positions
(the vector the runtime's heads read), each part weighted and each part logged per step.

After every epoch the held-out records are scored with the metric functions eval and
``heads fit`` report (delta MAE and sign agreement, flag precision/recall/F1 at the
predicted thresholds, Brier) and the reply tokens' loss; the best epoch's adapter and heads
are kept (``--best-by``). A checkpoint (adapter, heads, optimizer, schedule, random state
and the position in the epoch) is written after every epoch and when Ctrl-C stops the run,
so ``--resume`` continues exactly where it stopped: the batch order of an epoch is a pure
function of the seed and the epoch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from npcchat.errors import ConfigError, NpcchatError
from npcchat.types import DELTA_NAMES

from . import state_heads
from .data import Item
from .model import TrainModel

BEST_BY = ("loss", "flag_f1_macro", "delta_mae")


class Interrupted(NpcchatError):
    """Ctrl-C stopped the run; a resumable checkpoint was saved (exit code 130, as a shell
    reports an interrupted command)."""

    exit_code = 130


@dataclass(frozen=True)
class LoopSettings:
    epochs: int = 3
    max_steps: int = 0  # 0: as many as the epochs take
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    heads_lr: float = 1e-3
    warmup: float = 0.05  # share of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lm_weight: float = 1.0
    weights: state_heads.LossWeights = field(default_factory=state_heads.LossWeights)
    best_by: str = "loss"
    seed: int = 0

    def check(self) -> None:
        for name, value, low in (
            ("--epochs", self.epochs, 1),
            ("--batch-size", self.batch_size, 1),
            ("--grad-accum", self.grad_accum, 1),
            ("--max-steps", self.max_steps, 0),
        ):
            if value < low:
                raise ConfigError(f"{name} {value}: expected at least {low}")
        if not self.lr > 0 or not self.heads_lr > 0:
            raise ConfigError("--lr and --heads-lr: expected positive numbers")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"--warmup {self.warmup}: expected a share from 0 up to (not) 1")
        if self.best_by not in BEST_BY:
            raise ConfigError(f"--best-by {self.best_by}: expected one of {', '.join(BEST_BY)}")


@contextlib.contextmanager
def deferred_interrupt(reraise: bool = True) -> Iterator[None]:
    """Ctrl-C inside the block is held until the block ends, then raised (``reraise``) or
    dropped: a step or an epoch's bookkeeping is done whole. Only where Python's own
    Ctrl-C handler is in place (the main thread, SIGINT not ignored nor handled by someone
    else); elsewhere the block runs as it is."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught and reraise:
        raise KeyboardInterrupt


def batches(items: Sequence[Item], size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches (indexes into ``items``): similar lengths together (little
    padding), batches in a shuffled order; the same for the same seed and epoch."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(items))
    order = np.array(sorted(order, key=lambda i: len(items[i].ids) // 32), dtype=np.int64)
    chunks = [list(map(int, order[s : s + size])) for s in range(0, len(order), size)]
    return [chunks[i] for i in rng.permutation(len(chunks))]


def collate(items: Sequence[Item], device: str) -> dict[str, Any]:
    import torch

    width = max(len(x.ids) for x in items)
    ids = torch.zeros((len(items), width), dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    target = torch.full((len(items), width), -100, dtype=torch.long)
    for j, x in enumerate(items):
        n = len(x.ids)
        ids[j, :n] = torch.tensor(x.ids)
        mask[j, :n] = 1
        if n > x.n_prompt:  # position t predicts token t + 1: the reply and its end token
            target[j, x.n_prompt - 1 : n - 1] = torch.tensor(x.ids[x.n_prompt :])
    return {
        "ids": ids.to(device),
        "mask": mask.to(device),
        "target": target.to(device),
        "state": [list(x.state) for x in items],
        "delta": torch.tensor([x.delta for x in items], dtype=torch.float32).to(device),
        "flags": torch.tensor([x.flags for x in items], dtype=torch.float32).to(device),
        "thresholds": torch.tensor([x.thresholds for x in items], dtype=torch.float32).to(device),
        "tokens": int(mask.sum()),
    }


def losses(
    model: TrainModel, batch: dict[str, Any], s: LoopSettings, hidden: Any = None
) -> dict[str, Any]:
    """Every part of the loss, weighted, and ``"loss"``, their sum (``hidden``: the final
    hidden states when already computed)."""
    import torch

    with torch.autocast(
        device_type=model.device, dtype=torch.bfloat16, enabled=model.precision == "bf16"
    ):
        if hidden is None:
            hidden = model.forward(batch["ids"], batch["mask"])
        scored = batch["target"] != -100
        lm = state_heads.lm_loss(model.logits(hidden[scored]), batch["target"][scored])
    vectors = state_heads.state_vectors(hidden.float(), batch["state"])
    thresholds = batch["thresholds"]
    parts = state_heads.state_loss(
        model.heads,
        vectors,
        batch["delta"],
        batch["flags"],
        thresholds if bool((~torch.isnan(thresholds)).any()) else None,
        s.weights,
    )
    out = {"lm": lm * s.lm_weight, **{k: v for k, v in parts.items() if k != "total"}}
    out["loss"] = out["lm"] + parts["total"]
    out["vectors"] = vectors
    return out


def predict(model: TrainModel, items: Sequence[Item], s: LoopSettings) -> dict[str, Any]:
    """Held-out pass (no dropout, no gradient), one forward per batch of the training's
    size: the `<STATE>` vectors and the loss parts, weighted as in training."""
    import torch

    model.train(False)
    vectors: list[np.ndarray] = []
    sums: dict[str, float] = {}
    try:
        with torch.no_grad():
            for start in range(0, len(items), s.batch_size):
                chunk = items[start : start + s.batch_size]
                parts = losses(model, collate(chunk, model.device), s)
                vectors.append(parts.pop("vectors").cpu().numpy().astype(np.float64))
                for k, val in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(val) * len(chunk)
    finally:
        model.train(True)
    return {
        "vectors": np.concatenate(vectors) if vectors else np.zeros((0, model.hidden_size)),
        "loss": {k: v / max(1, len(items)) for k, v in sums.items()},
    }


def head_weights(model: TrainModel) -> Any:
    from npcchat_heads.onnx_builder import HeadWeights

    def wb(name: str) -> tuple[np.ndarray, np.ndarray]:
        layer = getattr(model.heads, name)
        return (
            layer.weight.detach().float().cpu().numpy(),
            layer.bias.detach().float().cpu().numpy(),
        )

    return HeadWeights(*wb("delta_head"), *wb("flag_head"), *wb("threshold_head"))


def score(
    model: TrainModel, items: Sequence[Item], flags: Sequence[str], s: LoopSettings
) -> dict[str, Any]:
    """The held-out metrics: ``heads fit``'s (eval's metric functions) and the losses."""
    from npcchat_heads.refit import Labels, held_out

    pred = predict(model, items, s)
    lab = Labels(
        np.array([x.delta for x in items], dtype=np.float64).reshape(-1, 2),
        np.array([x.flags for x in items], dtype=np.float64).reshape(-1, len(flags)),
        np.array([x.thresholds for x in items], dtype=np.float64).reshape(-1, len(flags)),
    )
    metrics = held_out(head_weights(model), pred["vectors"], lab, tuple(flags))
    maes = [
        metrics["delta"][n]["mae"] for n in DELTA_NAMES if metrics["delta"][n]["mae"] is not None
    ]
    metrics["delta_mae"] = float(np.mean(maes)) if maes else None
    metrics["loss"] = pred["loss"]
    return metrics


def better(new: dict[str, Any], old: dict[str, Any] | None, by: str) -> bool:
    """Whether ``new`` held-out scores beat ``old`` by ``by``; where the held-out labels
    give no value of ``by`` (no flag with positives, no delta), by the loss."""

    def value(m: dict[str, Any], key: str) -> float | None:
        if key == "loss":
            return float(m["loss"]["loss"])
        v = m.get(key)
        if v is None:
            return None
        return -float(v) if key == "flag_f1_macro" else float(v)

    if old is None:
        return True
    a, b = value(new, by), value(old, by)
    if a is None or b is None:
        a, b = value(new, "loss"), value(old, "loss")
    return a is not None and b is not None and a < b


def _log_records(log: Path) -> list[dict[str, Any]]:
    """The readable records of a run's log (a line torn by a crash is skipped)."""
    out: list[dict[str, Any]] = []
    if not log.is_file():
        return out
    for line in log.read_text("utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            out.append(r)
    return out


def _replace_dir(tmp: Path, final: Path) -> None:
    """``tmp`` becomes ``final`` (the old one removed only after the new one is whole)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


class Trainer:
    """One run in ``run_dir``: ``adapter/`` and ``heads/`` (the best epoch), ``checkpoint/``
    (resumable), ``log.jsonl`` (every step and every epoch's held-out scores)."""

    def __init__(
        self,
        model: TrainModel,
        train: Sequence[Item],
        held: Sequence[Item],
        flags: Sequence[str],
        settings: LoopSettings,
        run_dir: Path,
        extra_files: dict[str, str] | None = None,
    ) -> None:
        settings.check()
        self.model = model
        self.items = list(train)
        self.held = list(held)
        self.flags = list(flags)
        self.s = settings
        self.run_dir = run_dir
        self.extra_files = extra_files or {}  # tokenizer files saved beside the adapter
        per_epoch = math.ceil(
            math.ceil(len(self.items) / settings.batch_size) / settings.grad_accum
        )
        self.steps_per_epoch = per_epoch
        total = per_epoch * settings.epochs
        self.total_steps = min(total, settings.max_steps) if settings.max_steps else total
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of the current epoch already trained on
        self.best: dict[str, Any] | None = None
        self.best_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self._build_optimizer()
        # the random state as the last optimizer step left it: a checkpoint taken by Ctrl-C
        # in the middle of a step resumes as if the step had never begun
        self._rng = self._rng_state()
        self._saved: tuple[int, int, int] | None = None  # (step, epoch, batch) last saved

    @staticmethod
    def _rng_state() -> dict[str, Any]:
        import torch

        return {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def _build_optimizer(self) -> None:
        import torch

        groups = self.model.parameter_groups(self.s.weight_decay)
        groups[1]["lr"] = self.s.heads_lr  # the heads start from nothing: a larger rate
        for g in groups:
            g.setdefault("lr", self.s.lr)
        self.opt = torch.optim.AdamW(groups, lr=self.s.lr)
        warm = max(1, int(self.total_steps * self.s.warmup))
        total = max(1, self.total_steps)

        def factor(step: int) -> float:  # linear warmup, then cosine to 10 %
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, total - warm)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        import torch

        final = self.run_dir / "checkpoint"
        mark = (self.step, self.epoch, self.batch_in_epoch)
        if self._saved == mark and (final / "state.json").is_file():
            return final  # nothing changed since the last one (an epoch's end, then Ctrl-C)
        tmp = self.run_dir / ".checkpoint.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save_adapter(tmp / "adapter", full=False)
        self.model.save_heads(tmp / "heads", self.flags)
        torch.save(
            {
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                **self._rng,
            },
            tmp / "optimizer.pt",
        )
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
        }
        (tmp / "state.json").write_text(json.dumps(state), "utf-8")
        _replace_dir(tmp, final)
        self._saved = mark
        return final

    def resume(self) -> bool:
        """Continue from ``checkpoint/``; False when the run stopped before its first
        checkpoint (it starts over). Log lines written after the checkpoint (a crash
        between two checkpoints) are dropped: those steps run again."""
        import torch

        src = self.run_dir / "checkpoint"
        log = self.run_dir / "log.jsonl"
        old = self.run_dir / ".checkpoint.old"  # a crash between the two renames
        if not (src / "state.json").is_file() and (old / "state.json").is_file():
            src = old
        if not (src / "state.json").is_file():
            if any("best_epoch" in r for r in _log_records(log)):
                raise ConfigError(
                    f"{src}: missing, but epochs of this run ended: resuming would start over "
                    "and replace its adapter and heads",
                    hint="start a new run with another --out",
                )
            log.unlink(missing_ok=True)
            return False
        state = json.loads((src / "state.json").read_text("utf-8"))
        self.model.load_adapter(src / "adapter")
        self.model.load_heads(src / "heads")
        saved = torch.load(src / "optimizer.pt", weights_only=False)
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self._rng = self._rng_state()
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.best = state["best"]
        self.best_epoch = int(state["best_epoch"])
        self.history = list(state["history"])
        self.tokens_seen = int(state["tokens_seen"])
        self.train_seconds = float(state["train_seconds"])
        kept = [
            r
            for r in _log_records(log)
            if ((r["epoch"] <= self.epoch) if "best_epoch" in r else (r["step"] <= self.step))
        ]
        from npcchat.files.atomic import atomic_write

        atomic_write(log, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return True

    def _keep_best(self) -> None:
        tmp_a, tmp_h = self.run_dir / ".adapter.partial", self.run_dir / ".heads.partial"
        for tmp in (tmp_a, tmp_h):
            shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_adapter(tmp_a)
        for name, text in self.extra_files.items():
            (tmp_a / name).write_text(text, "utf-8")
        self.model.save_heads(tmp_h, self.flags)
        _replace_dir(tmp_a, self.run_dir / "adapter")
        _replace_dir(tmp_h, self.run_dir / "heads")

    def _log(self, record: dict[str, Any]) -> None:
        with (self.run_dir / "log.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    # -- the run --------------------------------------------------------------------------------
    def run(
        self,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Train to the end (or ``max_steps``). Ctrl-C: a checkpoint, then
        :class:`Interrupted`."""
        self.model.train(True)
        try:
            while self.epoch < self.s.epochs and self.step < self.total_steps:
                self._epoch(on_step, on_epoch)
            if self.batch_in_epoch:  # max_steps stopped it inside an epoch: score that too
                self._end_epoch(on_epoch)
        except KeyboardInterrupt:
            with deferred_interrupt(reraise=False):  # a second Ctrl-C: still saved, said so
                where = self.save_checkpoint()
            raise Interrupted(
                f"interrupted at step {self.step} of {self.total_steps}; checkpoint saved in "
                f"{where}",
                hint="run the same command with --resume to continue",
            ) from None
        if self.best_epoch == 0:  # no epoch ended (nothing to train on): keep what there is
            self._keep_best()
        return self.summary()

    def _epoch(
        self,
        on_step: Callable[[dict[str, Any]], None] | None,
        on_epoch: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        """The rest of the current epoch, from ``batch_in_epoch`` (always the start of an
        accumulation group: it only moves when an optimizer step is taken)."""
        import torch

        plan = batches(self.items, self.s.batch_size, self.s.seed, self.epoch)
        accum = self.s.grad_accum
        parts_sum: dict[str, float] = {}
        t_step = time.perf_counter()
        tokens = 0
        for b in range(self.batch_in_epoch, len(plan)):
            if self.step >= self.total_steps:
                return
            group = min(accum, len(plan) - (b // accum) * accum)  # the last one may be short
            batch = collate([self.items[i] for i in plan[b]], self.model.device)
            parts = losses(self.model, batch, self.s)
            parts.pop("vectors")
            (parts["loss"] / group).backward()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) / group
            tokens += batch["tokens"]
            if (b + 1) % accum and b != len(plan) - 1:
                continue
            # an optimizer step is whole or not at all: Ctrl-C waits for its end, so a
            # checkpoint never holds new weights with an old step count or random state
            with deferred_interrupt():
                if self.s.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.trainable(), self.s.max_grad_norm)
                lr = self.sched.get_last_lr()[0]
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                self.batch_in_epoch = b + 1
                self._rng = self._rng_state()
                seconds = time.perf_counter() - t_step
                self.train_seconds += seconds
                self.tokens_seen += tokens
                record = {
                    "step": self.step,
                    "epoch": self.epoch + 1,
                    "lr": lr,
                    **{k: round(v, 6) for k, v in parts_sum.items()},
                    "tokens": tokens,
                    "tokens_per_s": tokens / seconds if seconds > 0 else None,
                }
                self._log(record)
            if on_step:
                on_step({**record, "total_steps": self.total_steps})
            parts_sum, tokens = {}, 0
            t_step = time.perf_counter()
        self._end_epoch(on_epoch)

    def _end_epoch(self, on_epoch: Callable[[dict[str, Any]], None] | None) -> None:
        """Score the held-out records, keep the best, checkpoint. The scoring may be
        interrupted (nothing has changed yet: a resume scores again); what follows it is
        done whole."""
        metrics = score(self.model, self.held, self.flags, self.s) if self.held else None
        with deferred_interrupt():
            record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step}
            if metrics is None or better(metrics, self.best, self.s.best_by):
                self._keep_best()
                self.best, self.best_epoch = metrics, self.epoch + 1
            if metrics is not None:
                record["heldout"] = metrics
            record["best_epoch"] = self.best_epoch
            self.epoch += 1
            self.batch_in_epoch = 0
            self.history.append(record)
            self._log(record)
            self.save_checkpoint()
        if on_epoch:
            on_epoch(record)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.step,
            "epochs": self.epoch,
            "best_epoch": self.best_epoch,
            "best": self.best,
            "tokens": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 3),
            "tokens_per_s": self.tokens_seen / self.train_seconds if self.train_seconds else None,
            "history": self.history,
            "settings": {**asdict(self.s), "weights": asdict(self.s.weights)},
        }
