"""What several commands share: the config built from files and flags, the Ray options."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from npcchat import config as config_mod
from npcchat.config import Config
from npcchat.errors import BundleError, ConfigError

S = TypeVar("S")


def _given(section: S, **values: Any) -> S:
    """``section`` with the flags that were given (None: not given) applied."""
    given = {k: v for k, v in values.items() if v is not None}
    return replace(section, **given) if given else section  # type: ignore[type-var]


def build_config(
    path: Path | None,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    repeat_penalty: float | None = None,
    threads: int | None = None,
    gpu_layers: int | None = None,
    ctx: int | None = None,
    lora: Path | None = None,
    lora_scale: float | None = None,
) -> Config:
    """Config files first, then whatever flags were given; every other section (state,
    knowledge) as the files say."""
    cfg = config_mod.load(path)
    cfg = replace(
        cfg,
        runtime=_given(
            cfg.runtime,
            n_threads=threads,
            n_gpu_layers=gpu_layers,
            n_ctx=ctx,
            lora_path=str(lora) if lora else None,
            lora_scale=lora_scale,
        ),
        sampling=_given(
            cfg.sampling,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_tokens=max_tokens,
            seed=seed,
            repeat_penalty=repeat_penalty,
        ),
    )
    config_mod.validate(cfg, "command line")
    if lora is not None and not lora.is_file():
        raise BundleError(f"--lora {lora}: file not found")
    return cfg


# The Ray options of `eval` and `heads fit`. `--ray` is a flag and the address an option of
# its own: an option with an optional value would swallow the next word
# (`npcchat eval --ray suite.jsonl` would read the file name as an address).
RayFlag = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Run on Ray actors (the cluster $RAY_ADDRESS names, else Ray on this machine);"
        " --threads (and eval's --parallel) apply per actor.",
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(help="Ray cluster to run on (HOST:6379 or ray://HOST:10001); implies --ray."),
]
RayActors = Annotated[
    int | None,
    typer.Option(help="Ray actors, each loading the bundle once (default: CPUs / --threads)."),
]


@dataclass(frozen=True)
class RayTarget:
    """Where --ray runs: the cluster's address (None: $RAY_ADDRESS or this machine), how
    many actors (None: the cluster's CPUs / threads) and the CPU threads of each."""

    address: str | None
    actors: int | None
    threads: int


def ray_target(
    ray: bool, address: str | None, actors: int | None, threads: int | None
) -> RayTarget | None:
    """The Ray options checked (and the extra required), or None for a local run."""
    on_ray = ray or address is not None
    if actors is not None and not (on_ray and 1 <= actors <= 4096):
        raise ConfigError(f"--ray-actors {actors}: expected 1..4096, with --ray")
    if not on_ray:
        return None
    from npcchat import extras

    extras.require("ray", "--ray")
    return RayTarget(address, actors, threads or 1)
