"""The model being trained: a Hugging Face Qwen2 base with PEFT LoRA, the state heads beside
it, and the precision and device it runs at.

LoRA is set as the original notebook set it (r, alpha, dropout, target modules, per-module
rank and alpha patterns, rsLoRA). QLoRA loads the base in 4 bits through bitsandbytes,
which needs CUDA: anywhere else it is refused with one line before anything loads. When
the tokenizer gained scaffold tags, their rows of the embedding matrix learn: rows a real
Qwen2 base already has as padding (its matrix is wider than its vocabulary: 151,936 rows for
about 151,665 tokens), or new rows when the matrix must grow. Only those rows learn (the
gradient of every other row is zeroed, and no weight decay touches the matrix), and the whole
matrix is saved with the adapter as PEFT's ``save_embedding_layers`` writes it, which is
where ``npcchat convert`` takes the embeddings of added tokens from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from npcchat.errors import ConfigError

from . import state_heads


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rslora: bool = False

    def check(self) -> None:
        if self.r < 1:
            raise ConfigError(f"--lora-r {self.r}: expected a rank of at least 1")
        if not self.alpha > 0:
            raise ConfigError(f"--lora-alpha {self.alpha}: expected a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--lora-dropout {self.dropout}: expected 0 up to (not) 1")
        if not self.targets:
            raise ConfigError("--lora-targets: expected at least one module name")


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this torch sees no CUDA device", hint="--device cpu")
    if wanted not in ("cpu", "cuda"):
        raise ConfigError(f"--device {wanted}: expected auto, cpu or cuda")
    return wanted


def pick_precision(wanted: str, device: str) -> str:
    """``auto``: bf16 on a GPU that has it, else fp32 (CPU training stays in fp32: bf16
    matmuls on CPU are slower and the parity checks would lose their margin)."""
    import torch

    if wanted == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if wanted == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bf16", hint="--precision fp32")
    if wanted not in ("fp32", "bf16"):
        raise ConfigError(f"--precision {wanted}: expected auto, fp32 or bf16")
    return wanted


def check_qlora(device: str) -> None:
    """QLoRA needs CUDA and bitsandbytes; said in one line, before the base loads."""
    import importlib.util

    if device != "cuda":
        raise ConfigError("--qlora: 4-bit bases need a CUDA GPU; this run is on the CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--qlora: bitsandbytes is not installed", hint="pip install bitsandbytes")


def quiet() -> None:
    """transformers' own progress bars and deprecation chatter would tear through npcchat's
    progress display; its errors still surface as exceptions."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


class TrainModel:
    """Base + LoRA + state heads, on one device. :meth:`forward` gives the final hidden
    states (after the final norm, as the runtime reads them) and the reply logits."""

    def __init__(
        self,
        base: Path,
        n_vocab: int,
        new_ids: Sequence[int],
        n_flags: int,
        lora: LoraSettings,
        device: str,
        precision: str,
        qlora: bool,
        seed: int,
    ) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        lora.check()
        torch.manual_seed(seed)
        self.device = device
        self.precision = precision
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        kwargs: dict[str, Any] = {"dtype": dtype}
        if qlora:
            check_qlora(device)
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
            kwargs["device_map"] = {"": 0}
        quiet()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{base}: cannot load the base model ({e})") from None
        if getattr(model.config, "model_type", None) != "qwen2":
            raise ConfigError(
                f"{base / 'config.json'}: model_type {model.config.model_type!r}: npcchat "
                "trains Qwen2 models (its runtime and convert are Qwen2's)"
            )
        self.hidden_size = int(model.config.hidden_size)
        self.old_vocab = int(model.get_input_embeddings().weight.shape[0])
        self.new_ids = sorted(int(i) for i in new_ids)
        rows = max(n_vocab, self.new_ids[-1] + 1) if self.new_ids else n_vocab
        if rows > self.old_vocab:
            model.resize_token_embeddings(rows, mean_resizing=False)
        if qlora:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model)
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.targets),
            rank_pattern=dict(lora.rank_pattern),
            alpha_pattern=dict(lora.alpha_pattern),
            use_rslora=lora.rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            self.peft = get_peft_model(model, config)
        except ValueError as e:
            raise ConfigError(f"--lora-targets: {e}") from None
        self.causal = self.peft.base_model.model  # Qwen2ForCausalLM, LoRA layers inside
        self.heads = state_heads.heads(self.hidden_size, n_flags)
        self.token_rows: dict[str, Any] = {}  # "embed" / "head": [k, hidden] parameters
        if self.new_ids:
            self._train_new_rows()
        if not qlora:
            self.peft.to(device)
        self.heads.to(device)
        for p in self.token_rows.values():
            p.data = p.data.to(device)

    def _train_new_rows(self) -> None:
        """The added tags' rows as small parameters of their own ([k, hidden], the mean of
        the real tokens' rows to start), spliced into the embedding's output and the
        vocabulary projection by forward hooks: the optimizer holds k rows, not the matrix
        (for Qwen2.5-7B, 152,064 x 3,584). :meth:`save_adapter` writes them into the matrix."""
        import torch
        from torch import nn

        embed = self.causal.get_input_embeddings()
        head = self.causal.get_output_embeddings()
        real = min(self.new_ids)
        ids = torch.tensor(self.new_ids)

        def rows_of(weight: Any) -> Any:
            with torch.no_grad():
                start = weight[:real].float().mean(dim=0)
            return nn.Parameter(start.repeat(len(self.new_ids), 1))

        self.token_rows["embed"] = rows_of(embed.weight)
        tied = head is not None and head.weight is embed.weight
        if head is not None:
            self.token_rows["head"] = self.token_rows["embed"] if tied else rows_of(head.weight)
        lookup = torch.full((embed.weight.shape[0],), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(self.new_ids))

        def splice_embedding(_m: Any, inputs: Any, out: Any) -> Any:
            which = lookup.to(out.device)[inputs[0]]
            hit = which >= 0
            if not bool(hit.any()):
                return out
            out = out.clone()
            out[hit] = self.token_rows["embed"][which[hit]].to(out.dtype)
            return out

        def splice_logits(_m: Any, inputs: Any, out: Any) -> Any:
            hidden = inputs[0]
            rows = self.token_rows["head"].to(hidden.dtype)
            out = out.clone()
            out[..., ids.to(out.device)] = (hidden @ rows.T).to(out.dtype)
            return out

        embed.register_forward_hook(splice_embedding)
        if head is not None:
            head.register_forward_hook(splice_logits)

    def _sync_rows(self) -> None:
        """The trained rows into the matrices (what is saved, and what convert reads)."""
        import torch

        with torch.no_grad():
            for key, layer in (
                ("embed", self.causal.get_input_embeddings()),
                ("head", self.causal.get_output_embeddings()),
            ):
                if key in self.token_rows and layer is not None:
                    w = layer.weight
                    w[self.new_ids] = self.token_rows[key].to(w.device, w.dtype)

    # -- parameters -------------------------------------------------------------------------
    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        lora = [p for p in self.peft.parameters() if p.requires_grad]
        groups = [
            {"params": lora, "weight_decay": weight_decay},
            {"params": list(self.heads.parameters()), "weight_decay": weight_decay},
        ]
        rows = list({id(p): p for p in self.token_rows.values()}.values())
        if rows:
            groups.append({"params": rows, "weight_decay": 0.0})
        return groups

    def trainable(self) -> list[Any]:
        return [p for g in self.parameter_groups(0.0) for p in g["params"]]

    def train(self, on: bool = True) -> None:
        self.peft.train(on)
        self.heads.train(on)

    # -- computing ----------------------------------------------------------------------------
    def forward(self, ids: Any, mask: Any) -> Any:
        """``[batch, time, hidden]`` final hidden states, after the final norm."""
        out = self.causal.model(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state

    def logits(self, hidden: Any) -> Any:
        return self.causal.lm_head(hidden)

    # -- saving -------------------------------------------------------------------------------
    def save_adapter(self, out: Path, full: bool = True) -> None:
        """A PEFT adapter directory (safetensors). With added tags, ``full``: the whole
        embedding matrices with it, as PEFT's ``save_embedding_layers`` writes them (what
        convert reads); otherwise (a checkpoint) only the tags' rows, in
        ``token_rows.safetensors``."""
        if self.new_ids and full:
            self._sync_rows()
        self.peft.save_pretrained(
            str(out), safe_serialization=True, save_embedding_layers=bool(self.new_ids) and full
        )
        if self.new_ids and not full:
            from npcchat.files.safetensors import save

            save(
                {k: v.detach().float().cpu().numpy() for k, v in self.token_rows.items()},
                out / "token_rows.safetensors",
            )

    def load_adapter(self, src: Path) -> None:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(src / "adapter_model.safetensors"), device=self.device)
        result = set_peft_model_state_dict(self.peft, state)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        if missing:
            raise ConfigError(f"{src}: the checkpoint does not fit this model ({missing[0]})")
        if not self.new_ids:
            return
        rows_file = src / "token_rows.safetensors"
        with torch.no_grad():
            if rows_file.is_file():
                saved = load_file(str(rows_file), device=self.device)
                for key, value in saved.items():
                    if key in self.token_rows:
                        self.token_rows[key].copy_(value)
            else:  # a full adapter: the rows out of the saved matrices
                for key, name in (
                    ("embed", "base_model.model.model.embed_tokens.weight"),
                    ("head", "base_model.model.lm_head.weight"),
                ):
                    if key in self.token_rows and name in state:
                        self.token_rows[key].copy_(state[name][self.new_ids].float())
        self._sync_rows()

    def save_heads(self, out: Path, flags: list[str]) -> None:
        """``delta_head``/``flag_head``/``threshold_head`` as safetensors + ``flags.json``:
        what ``npcchat convert --heads`` reads."""
        from npcchat.files.safetensors import save

        out.mkdir(parents=True, exist_ok=True)
        for name in ("delta_head", "flag_head", "threshold_head"):
            layer = getattr(self.heads, name)
            save(
                {
                    "weight": layer.weight.detach().float().cpu().numpy(),
                    "bias": layer.bias.detach().float().cpu().numpy(),
                },
                out / f"{name}.safetensors",
            )
        (out / "flags.json").write_text(json.dumps({"ALL_FLAGS": flags}), "utf-8")

    def load_heads(self, src: Path) -> None:
        import torch

        from npcchat.files.safetensors import SafeFile

        with torch.no_grad():
            for name in ("delta_head", "flag_head", "threshold_head"):
                f = SafeFile(src / f"{name}.safetensors")
                layer = getattr(self.heads, name)
                layer.weight.copy_(torch.from_numpy(f.get("weight").copy()))
                layer.bias.copy_(torch.from_numpy(f.get("bias").copy()))

    def describe(self) -> dict[str, Any]:
        trainable = sum(p.numel() for p in self.trainable())
        total = sum(p.numel() for p in self.peft.parameters()) + sum(
            p.numel() for p in self.heads.parameters()
        )
        return {
            "device": self.device,
            "precision": self.precision,
            "trainable_parameters": int(trainable),
            "parameters": int(total),
            "tokens_trained": len(self.new_ids),
            "rows_added": int(self.causal.get_input_embeddings().weight.shape[0] - self.old_vocab),
        }


def settings_dict(lora: LoraSettings) -> dict[str, Any]:
    d = asdict(lora)
    d["targets"] = list(lora.targets)
    return d
