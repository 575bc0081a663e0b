"""Child process of ``npcchat bench`` measuring peak RSS of one mode in a fresh process.

``llama``: llama.cpp alone (load the GGUF, decode the prompt, generate) — the baseline.
``npcchat``: a full npcchat turn (bundle checks, heads, prompt building, the same tokens).
Prints ``{"maxrss_mb": ...}``.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def main(mode: str, bundle_dir: str, session_file: str, cfg_file: str, gen_tokens: str) -> None:
    from npcchat.config import Config, RuntimeConfig
    from npcchat.files.toml import read_toml
    from npcchat.runtime import bundle as bundle_mod
    from npcchat.sessions import session as session_mod
    from npcchat.types import SamplingParams

    runtime = RuntimeConfig(**read_toml(Path(cfg_file)))
    n = int(gen_tokens)
    params = SamplingParams(temperature=0.0, top_p=1.0, repeat_penalty=1.05, max_tokens=n, seed=0)
    b = bundle_mod.load(Path(bundle_dir))
    s = session_mod.load(Path(session_file))
    if mode == "llama":
        from npcchat.bench.baseline import baseline_generate
        from npcchat.runtime.backend import Model

        tokens = json.loads(Path(session_file).with_suffix(".tokens").read_text())
        with Model(b.gguf, runtime) as model:
            baseline_generate(model, tokens, n, params, 0)
    else:
        from npcchat.runtime.engine import Engine

        with Engine.load(b, Config(runtime=runtime)) as engine:
            engine.turn(s, "Have you seen anything strange around the factory lately?", params)
    print(json.dumps({"maxrss_mb": peak_rss_kb() / 1024}))


def peak_rss_kb() -> int:
    """Peak RSS of this process image. ``ru_maxrss`` is no good here: Linux carries it over
    ``exec`` from the forked parent (which holds a whole model), so read VmHWM instead."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


if __name__ == "__main__":
    main(*sys.argv[1:6])
