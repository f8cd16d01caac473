"""rope_reposition against Hugging Face's own RoPE (the outside oracle) and the fp64 formula."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from cacheblend_ext import ops, reference
from cacheblend_ext.rope import rope_spec_from_config
from helpers import DEVICES, DTYPES, assert_close_to_ref, poison_, rope_table

MAX_POS = 40_000

# Hugging Face configs of each RoPE scaling type that Llama-family checkpoints use.
ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 10000},
}


def _config(rope_type: str, head_dim: int = 64) -> LlamaConfig:
    return LlamaConfig(hidden_size=3 * head_dim, num_attention_heads=3, num_key_value_heads=3, head_dim=head_dim,
                       max_position_embeddings=MAX_POS, rope_parameters=dict(ROPE_PARAMETERS[rope_type]))


def _hf_rotate(rotary: LlamaRotaryEmbedding, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """HF's rotation of raw x [T, H, D] at pos, with HF's inv_freq and attention scaling,
    and the angles taken in float64 (HF's forward rounds them to float32, which at 32k
    positions is off by ~1e-3 rad: that would test HF's rounding, not ours)."""
    freqs = pos.double()[:, None] * rotary.inv_freq.double()[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling
    xh = x.double().transpose(0, 1)[None]  # [1, H, T, D]
    rotated, _ = apply_rotary_pos_emb(xh, xh, cos[None], sin[None])
    return rotated[0].transpose(0, 1)


def _positions(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random src/dst in [0, 32768 + 1000): deltas of both signs, large and small."""
    src = torch.randint(0, 33_768, (n,), generator=gen)
    dst = torch.randint(0, 33_768, (n,), generator=gen)
    dst[: n // 4] = (src[: n // 4] + torch.randint(-8, 9, (n // 4,), generator=gen)).clamp(0, 33_767)
    return src, dst


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_matches_hugging_face(rope_type, dtype, device):
    gen = torch.Generator().manual_seed(1)
    config = _config(rope_type)
    rotary = LlamaRotaryEmbedding(config)
    spec = rope_spec_from_config(config, device=device)
    raw = torch.randn(65, 3, 64, generator=gen, dtype=torch.float64)
    src, dst = _positions(65, gen)
    cached = _hf_rotate(rotary, raw, src).to(device, dtype)
    expected = _hf_rotate(rotary, raw, dst)
    ops.rope_reposition(cached, src.to(device), dst.to(device), spec.cos_sin_cache, is_neox=True)
    # One rounding of the cached input and one of the output.
    assert_close_to_ref(cached, expected, dtype, factor=2.0)


def test_table_matches_hugging_face_forward():
    """At moderate positions HF's own float32 forward agrees with our table."""
    for rope_type in ROPE_PARAMETERS:
        config = _config(rope_type)
        rotary = LlamaRotaryEmbedding(config)
        pos = torch.arange(0, 4096, 37)
        cos, sin = rotary(torch.ones(1, dtype=torch.float32), pos[None])
        table = rope_spec_from_config(config, max_position=4096).cos_sin_cache[pos]
        half = table.shape[1] // 2
        torch.testing.assert_close(table[:, :half], cos[0, :, :half], atol=2e-3, rtol=0)
        torch.testing.assert_close(table[:, half:], sin[0, :, :half], atol=2e-3, rtol=0)


def _table(rotary_dim: int, max_pos: int = 5000, factor: float = 1.0) -> torch.Tensor:
    return rope_table(rotary_dim, max_pos, factor)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 128), (128, 64), (80, 32), (6, 2)])
@pytest.mark.parametrize("num_tokens", [1, 7, 65, 1000])
def test_formula_styles_partial_rotary(num_tokens, head_dim, rotary_dim, is_neox, dtype, device):
    """GPT-J and NeoX styles, partial rotary dims: raw key rotated at src then
    re-positioned equals the raw key rotated at dst (fp64 formula)."""
    table = _table(rotary_dim, factor=1.17)  # a YaRN-like factor must cancel
    raw = torch.randn(num_tokens, 3, head_dim, dtype=torch.float64)
    src = torch.randint(0, 5000, (num_tokens,))
    dst = torch.randint(0, 5000, (num_tokens,))
    cached = reference.rope_rotate(raw, src, table, is_neox)
    expected = reference.rope_rotate(raw, dst, table, is_neox)
    key = cached.to(device, dtype)
    ops.rope_reposition(key, src.to(device), dst.to(device), table.to(device), is_neox)
    assert_close_to_ref(key, expected, dtype, factor=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("out_offset", [8, 1], ids=["aligned", "misaligned"])
def test_out_of_place_strided(out_offset, is_neox, dtype, device):
    """Strided key (a head-sliced view of a larger buffer) and strided out (16-byte aligned
    rows, or rows one element off); key unchanged, every out element written (NaN poison),
    pass-through dims copied."""
    table = _table(64).to(device)
    big = torch.randn(130, 5, 128, device=device).to(dtype)
    key = big[::2, 1:4, :96]  # token stride 2*5*128, head stride 128, D = 96 > rotary_dim
    out_big = poison_(torch.empty(65, 4, 112, device=device, dtype=dtype))
    out = out_big[:, :3, out_offset:out_offset + 96]
    before = key.clone()
    src = torch.randint(0, 5000, (65,), device=device, dtype=torch.int32)
    dst = torch.randint(0, 5000, (65,), device=device, dtype=torch.int32)
    result = ops.rope_reposition(key, src, dst, table, is_neox, out=out)
    assert result is out
    assert torch.equal(key, before)
    expected = reference.rope_reposition(key.cpu(), src.cpu(), dst.cpu(), table.cpu(), is_neox)
    assert_close_to_ref(out, expected, dtype)
    assert torch.equal(out[..., 64:].cpu(), key[..., 64:].cpu())
    # Elements of out_big outside the view stay poisoned.
    assert out_big[:, 3:].isnan().all() and out_big[:, :, :out_offset].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_round_trip(device):
    """src -> dst -> src gives the original keys back (fp32)."""
    table = _table(128).to(device)
    key = torch.randn(1000, 8, 128, device=device)
    orig = key.clone()
    src = torch.randint(0, 5000, (1000,), device=device)
    dst = torch.randint(0, 5000, (1000,), device=device)
    ops.rope_reposition(key, src, dst, table)
    assert not torch.allclose(key, orig)
    ops.rope_reposition(key, dst, src, table)
    torch.testing.assert_close(key, orig, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    table = _table(64).to(device)
    key = torch.randn(9, 2, 64, device=device)
    src = torch.randint(0, 5000, (9,), device=device)
    dst = torch.randint(0, 5000, (9,), device=device)
    torch.library.opcheck(torch.ops.cacheblend.rope_reposition.default, (key, src, dst, table, True))
    out = torch.empty_like(key)
    torch.library.opcheck(torch.ops.cacheblend.rope_reposition_out.default, (key, src, dst, table, False),
                          {"out": out})


def test_bad_inputs():
    table = _table(64)
    key = torch.randn(4, 2, 64)
    pos = torch.arange(4)
    cases = [
        (dict(key=key.to(torch.int32)), "key must be float16, bfloat16 or float32"),
        (dict(key=key[0]), r"key must be \[num_tokens, num_heads, head_dim\]"),
        (dict(key=torch.randn(4, 2, 128)[..., ::2]), "contiguous last dimension"),
        (dict(src_pos=pos.float()), "src_pos must be int32 or int64"),
        (dict(dst_pos=pos[:3]), "dst_pos must have one entry per token"),
        (dict(dst_pos=pos.int()), "dst_pos must have the dtype of src_pos"),
        (dict(cos_sin_cache=table.double()), "cos_sin_cache must be float32"),
        (dict(cos_sin_cache=torch.randn(100, 63)), "rotary_dim .* must be even"),
        (dict(cos_sin_cache=torch.randn(100, 66)), "rotary_dim 66 exceeds head_dim 64"),
        (dict(dst_pos=torch.tensor([0, 1, 5000, 2])), r"dst_pos\[2\] = 5000 is outside \[0, 5000\)"),
        (dict(src_pos=torch.tensor([0, -1, 1, 2])), r"src_pos\[1\] = -1 is outside"),
    ]
    for overrides, message in cases:
        args = dict(key=key.clone(), src_pos=pos, dst_pos=pos, cos_sin_cache=table)
        args.update(overrides)
        with pytest.raises(RuntimeError, match=message):
            ops.rope_reposition(args["key"], args["src_pos"], args["dst_pos"], args["cos_sin_cache"])
    with pytest.raises(RuntimeError, match="out must have the shape of key"):
        ops.rope_reposition(key, pos, pos, table, out=torch.empty(4, 2, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_cuda():
    key = torch.randn(4, 2, 64, device="cuda")
    with pytest.raises(RuntimeError, match="src_pos must be on the same device as key"):
        ops.rope_reposition(key, torch.arange(4), torch.arange(4, device="cuda"), _table(64).cuda())
