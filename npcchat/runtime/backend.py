"""llama.cpp backend: the only module that imports llama_cpp.

One :class:`Model` owns every native object (model, context, batch, samplers, LoRA) and
frees them in :meth:`Model.close`. It speaks the low-level API because a turn needs what
``Llama.__call__`` cannot give: one prefill that yields both the hidden state at
``<STATE>`` and the logits of the first reply token.

How the prefill gets hidden states without asking for an output per prompt token: runs
of the prompt that need no output are decoded with embeddings off and no output flags;
the short runs holding ``<STATE>`` and the last token are decoded with
``llama_set_embeddings(ctx, True)``, which makes llama.cpp output every token of that
batch (llama-batch.cpp: "embeddings required ... -> overriding") with both the
post-final-norm hidden state (pooling NONE) and the logits. ``Llama.embed()`` is no use
here: it clears the KV cache and tokenizes without special tokens.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp as ll
import numpy as np

from npcchat.config import RuntimeConfig
from npcchat.errors import BackendError, BundleError
from npcchat.runtime.prefill import Chunk, plan_prefill
from npcchat.types import SamplingParams

_LOG: deque[str] = deque(maxlen=200)
_initialized = False
_QUANT_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
_progress: Callable[[int, int], None] | None = None


@ll.llama_log_callback  # type: ignore[untyped-decorator]
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp logs a lot to stderr; keep it for error messages and quantize reports.
    line = text.decode("utf-8", "replace")
    _LOG.append(line)
    if _progress is not None and (m := _QUANT_LINE.match(line)):
        _progress(int(m.group(1)), int(m.group(2)))  # "[  12/ 291] blk.1.attn_q.weight ..."


def _init() -> None:
    global _initialized
    if not _initialized:
        ll.llama_log_set(_log_callback, ctypes.c_void_p(0))
        ll.llama_backend_init()
        _initialized = True


def recent_log(contains: str = "") -> list[str]:
    return [line.strip() for line in _LOG if contains in line]


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def build_info() -> dict[str, Any]:
    """What this llama.cpp build can do: its version, the backends compiled in (CPU features,
    CUDA/Metal/Vulkan/BLAS when present), GPU offload support and the default thread count."""
    _init()
    system = ll.llama_print_system_info().decode("utf-8", "replace").strip()
    backends: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for field in (f.strip() for f in system.split("|")):
        if " : " in field:  # "CPU : SSE3 = 1" starts the CPU backend's features
            name, _, field = field.partition(" : ")
            current = backends.setdefault(name.strip(), {})
        key, eq, value = field.partition("=")
        if current is not None and eq:
            current[key.strip()] = value.strip()
    return {
        "version": str(getattr(ll, "__version__", "unknown")),
        "backends": backends,
        "gpu_offload": bool(ll.llama_supports_gpu_offload()),
        "mmap": bool(ll.llama_supports_mmap()),
        "default_threads": default_threads(),
        "system_info": system,
    }


QUANT_TYPES = {
    "q4_k_m": ll.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_k_m": ll.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q6_k": ll.LLAMA_FTYPE_MOSTLY_Q6_K,
    "q8_0": ll.LLAMA_FTYPE_MOSTLY_Q8_0,
    "f16": ll.LLAMA_FTYPE_MOSTLY_F16,
    "f32": ll.LLAMA_FTYPE_ALL_F32,
}


def quantize(
    src: Path,
    dst: Path,
    quant: str,
    threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Run llama.cpp's quantizer; returns its log lines about fallback tensor types.
    ``progress(done, total)`` follows the per-tensor lines llama.cpp logs."""
    global _progress
    _init()
    params = ll.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.nthread = threads or default_threads()
    _LOG.clear()
    _progress = progress
    try:
        rc = ll.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        _progress = None
    if rc != 0:
        tail = " | ".join(recent_log()[-3:])
        raise BackendError(f"llama.cpp could not quantize {src} to {quant} (code {rc}): {tail}")
    return recent_log("fallback")


class Model:
    """A loaded GGUF with one context and one reusable batch.

    ``n_seq`` > 1 gives that many independent sequences (own KV stream each, of
    ``runtime.n_ctx`` tokens) so several turns can generate in one batched decode per
    step: decoding is memory-bound, and reading the weights once for 8 tokens instead
    of 8 times is where parallel eval gets its throughput.
    """

    def __init__(self, path: Path, runtime: RuntimeConfig, n_seq: int = 1) -> None:
        _init()
        self.path = path
        self._model = None
        self._ctx = None
        self._batch = None
        self._samplers: dict[int, object] = {}
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = runtime.n_gpu_layers
        # CPU weight repacking computes one-token and many-token matmuls with different
        # kernels, so a reply would depend on how many sequences decode together; off by
        # default (measured here: no speed difference for Q4_K_M on 2 cores).
        mparams.use_extra_bufts = runtime.repack
        model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            tail = " | ".join(recent_log()[-2:])
            raise BundleError(f"{path}: llama.cpp cannot load this GGUF ({tail})")
        self._model = model
        self._vocab = ll.llama_model_get_vocab(model)
        self.n_embd = int(ll.llama_model_n_embd(model))
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = runtime.n_ctx * n_seq
        cparams.n_seq_max = n_seq
        cparams.kv_unified = False  # one KV stream per sequence: no cross-sequence masking work
        cparams.n_batch = cparams.n_ubatch = max(n_seq, min(runtime.n_batch, runtime.n_ctx))
        threads = runtime.n_threads or default_threads()
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = (
            ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if runtime.flash_attn
            else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.pooling_type = ll.LLAMA_POOLING_TYPE_NONE
        cparams.embeddings = False
        cparams.no_perf = True
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            self.close()
            raise BackendError(
                f"{path}: llama.cpp cannot create a context of {runtime.n_ctx} tokens"
            )
        self._ctx = ctx
        self.n_seq = n_seq
        self.n_ctx = int(ll.llama_n_ctx_seq(ctx))  # per sequence
        self.n_batch = int(cparams.n_batch)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self._mem = ll.llama_get_memory(ctx)
        self._piece_buf = ctypes.create_string_buffer(256)
        self.decoded_tokens = 0  # every token llama_decode processed (tests count passes)
        if runtime.lora_path:
            self._set_lora(Path(runtime.lora_path), runtime.lora_scale)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Free every native object exactly once (safe to call twice)."""
        for smpl in self._samplers.values():
            ll.llama_sampler_free(smpl)
        self._samplers.clear()
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            ll.llama_model_free(self._model)  # also frees LoRA adapters loaded on it
            self._model = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _set_lora(self, path: Path, scale: float) -> None:
        adapter = ll.llama_adapter_lora_init(self._model, str(path).encode())
        if not adapter:
            self.close()
            raise BundleError(
                f"{path}: llama.cpp cannot load this LoRA adapter for {self.path.name}"
            )
        arr = (ll.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(scale)
        if ll.llama_set_adapters_lora(self._ctx, arr, 1, scales) != 0:
            self.close()
            raise BackendError(f"{path}: llama.cpp refused to apply the LoRA adapter")

    # -- vocabulary -----------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Tokens of ``text``; ``special`` lets control-token text become control tokens.
        A lone surrogate (undecodable input kept by Python) becomes '?', never an error."""
        data = text.encode("utf-8", "replace")
        cap = len(data) + 8
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, False, special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, False, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token; control tokens give b"" (so text stops never see them)."""
        n = ll.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def is_control(self, token: int) -> bool:
        return bool(ll.llama_vocab_get_attr(self._vocab, token) & ll.LLAMA_TOKEN_ATTR_CONTROL)

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self._vocab, token))

    def eos(self) -> int:
        return int(ll.llama_vocab_eos(self._vocab))

    # -- decoding -------------------------------------------------------------------------
    def decode(
        self,
        tokens: Sequence[int],
        pos0: int,
        outputs: bool,
        last_only: bool = False,
        seq: int = 0,
    ) -> None:
        """One llama_decode of ``tokens`` at ``pos0`` of sequence ``seq``; ``outputs`` flags
        every token (or, with ``last_only``, just the last one) as an output."""
        self._run(
            [
                (seq, tok, pos0 + i, outputs and (not last_only or i == len(tokens) - 1))
                for i, tok in enumerate(tokens)
            ]
        )

    def _run(self, items: Sequence[tuple[int, int, int, bool]]) -> None:
        """Decode ``(seq, token, pos, output)`` items as one batch."""
        b = self._batch
        assert b is not None, "model is closed"
        for i, (seq, tok, pos, out) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
        b.n_tokens = len(items)
        rc = ll.llama_decode(self._ctx, b)
        if rc != 0:
            raise BackendError(f"llama_decode failed (code {rc}) at position {items[0][2]}")
        self.decoded_tokens += len(items)

    def keep_prefix(self, n: int, seq: int = 0) -> None:
        """Drop sequence ``seq``'s KV entries from position ``n`` on (0: all of them)."""
        if n <= 0 and self.n_seq == 1:
            ll.llama_memory_clear(self._mem, True)
        else:
            ll.llama_memory_seq_rm(self._mem, seq, max(0, n), -1)

    def extend(self, tokens: Sequence[int], start: int, seq: int = 0) -> None:
        """Decode ``tokens[start:]`` into ``seq``'s KV cache with no outputs at all (in
        pieces of near-equal size, as a prompt's plain runs)."""
        self.keep_prefix(start, seq)
        for c in plan_prefill(len(tokens), [], self.n_batch, start):
            self.decode(tokens[c.start : c.end], c.start, False, seq=seq)

    def share(self, src: int, dst: int, keep: int) -> None:
        """Make sequence ``dst`` hold the first ``keep`` positions of ``src``'s KV cache.

        Each sequence has a KV stream of its own, and llama.cpp copies across streams only
        whole (llama-kv-cache.cpp: "seq_cp() is only supported for full KV buffers"; the
        copy runs at the next decode), so the whole stream is copied and its tail dropped.
        """
        if src != dst:
            ll.llama_memory_seq_rm(self._mem, dst, 0, -1)
            ll.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        ll.llama_memory_seq_rm(self._mem, dst, max(0, keep), -1)

    def prefill_chunk(
        self, tokens: Sequence[int], chunk: Chunk, outputs: Sequence[int], seq: int = 0
    ) -> dict[int, np.ndarray]:
        """One decode call of a prompt (the engine cuts it, see
        :func:`npcchat.runtime.prefill.plan_prefill`): ``tokens[chunk.start:chunk.end]`` at
        their positions in sequence ``seq``, whose KV cache holds ``tokens[:chunk.start]``.

        For an embeddings chunk, returns the post-final-norm hidden states at the
        ``outputs`` inside it, and the logits of the chunk's last token stay in the context
        for :meth:`sample` until the next decode.
        """
        part = tokens[chunk.start : chunk.end]
        if not chunk.embeddings:
            self.decode(part, chunk.start, False, seq=seq)
            return {}
        ll.llama_set_embeddings(self._ctx, True)
        try:
            self.decode(part, chunk.start, True, seq=seq)
        finally:
            ll.llama_set_embeddings(self._ctx, False)
        states: dict[int, np.ndarray] = {}
        for p in outputs:
            if chunk.start <= p < chunk.end:
                ptr = ll.llama_get_embeddings_ith(self._ctx, p - chunk.start)
                states[p] = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()
        return states

    def state_get(self, seq: int = 0) -> bytes:
        """llama.cpp's state (KV cache) of one sequence, for a snapshot."""
        size = int(ll.llama_state_seq_get_size(self._ctx, seq))
        buf = (ctypes.c_ubyte * size)()
        n = int(ll.llama_state_seq_get_data(self._ctx, buf, size, seq))
        # one copy of the bytes: slicing a ctypes array would build a Python int per byte
        # (75 ms for a 3.7 MB snapshot, measured; this is about 1 ms)
        return ctypes.string_at(buf, n)

    def state_set(self, seq: int, data: bytes) -> bool:
        """Load a sequence state saved by :meth:`state_get`; False when llama.cpp refuses."""
        self.keep_prefix(0, seq)
        buf = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
        return int(ll.llama_state_seq_set_data(self._ctx, buf, len(data), seq)) > 0

    def new_sampler(self, params: SamplingParams, seed: int, seq: int = 0) -> None:
        """Build ``seq``'s sampling chain in transformers' order (the original's): repetition
        penalty, temperature, top-k, top-p, draw. Top-k first keeps top-p from sorting the
        whole vocabulary at every token; the set it keeps is the same whatever the
        temperature (scaling does not change the order)."""
        old = self._samplers.pop(seq, None)
        if old is not None:
            ll.llama_sampler_free(old)
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if params.repeat_penalty != 1.0:
            ll.llama_sampler_chain_add(
                chain,
                ll.llama_sampler_init_penalties(self.n_vocab, 64, params.repeat_penalty, 0.0, 0.0),
            )
        if params.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(params.temperature))
            if 0 < params.top_k < self.n_vocab:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(params.top_k))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        self._samplers[seq] = chain

    def sample(self, seq: int = 0, idx: int = -1) -> int:
        """Draw ``seq``'s next token from output ``idx`` of the last decode (the sampler
        records it for its repetition penalty)."""
        return int(ll.llama_sampler_sample(self._samplers[seq], self._ctx, idx))

    def sample_banned(self, banned: Sequence[int], seq: int = 0, idx: int = -1) -> int:
        """:meth:`sample`, with ``banned`` tokens impossible for this one draw (a reply
        check backed up over them): their logits are set to -inf in llama.cpp's buffer."""
        logits = ll.llama_get_logits_ith(self._ctx, idx)
        for token in banned:
            if 0 <= token < self.n_vocab:
                logits[token] = float("-inf")
        return self.sample(seq, idx)

    def choose(self, tokens: Sequence[int], pos: int, grammar: str, seq: int = 0) -> list[int]:
        """Decode ``tokens`` at ``pos`` in ``seq``, then generate greedily under a GBNF
        ``grammar`` (llama.cpp's grammar sampler) until it ends: the tokens chosen (the
        stop token not among them). The KV cache keeps all of it."""
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        rule = ll.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not rule:
            ll.llama_sampler_free(chain)
            raise BackendError("llama.cpp refused a choice grammar")
        ll.llama_sampler_chain_add(chain, rule)
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        out: list[int] = []
        try:
            self.decode(tuple(tokens), pos, True, last_only=True, seq=seq)
            pos += len(tokens)
            for _ in range(256):  # a choice is a few tokens; the grammar ends it
                tok = int(ll.llama_sampler_sample(chain, self._ctx, -1))
                if ll.llama_vocab_is_eog(self._vocab, tok):
                    break
                out.append(tok)
                self.decode((tok,), pos, True, seq=seq)
                pos += 1
        finally:
            ll.llama_sampler_free(chain)
        return out

    def step(self, token: int, pos: int, seq: int = 0) -> None:
        """Decode one generated token at ``pos`` so its logits can be sampled."""
        self.decode((token,), pos, True, seq=seq)

    def step_many(self, items: Sequence[tuple[int, int, int]]) -> None:
        """Decode one token for each ``(seq, token, pos)`` in one batch; output ``i`` of
        the decode belongs to ``items[i]``."""
        self._run([(seq, tok, pos, True) for seq, tok, pos in items])

    def generate(
        self, first_pos: int, max_tokens: int, stop: frozenset[int], seq: int = 0
    ) -> Iterator[int]:
        """Sample up to ``max_tokens`` tokens after a prefill; yields each one, stop token
        included (not decoded), so callers can tell why generation ended."""
        pos = first_pos
        for i in range(max_tokens):
            tok = self.sample(seq)
            yield tok
            if tok in stop or i == max_tokens - 1 or pos >= self.n_ctx:
                return
            self.step(tok, pos, seq)
            pos += 1
