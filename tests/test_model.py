"""Numerical properties of glmkit.model.GLM: cache vs no-cache, the GLM prefix mask, left padding,
the rotary schemes, init and the cache's errors.

    .venv/bin/python -m pytest tests/test_model.py -q

Hermetic and CPU-only: every model is a tiny random-init config built here (fp32, eval, no_grad).
Biases and norm weights are randomized after init so that every code path moves the numbers.
The rotary layouts are checked against small re-statements of the upstream formulas
(ChatGLM-6B `modeling_chatglm.py`, HF `modeling_glm.py`).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glmkit import fused, kernels
from glmkit.config import ModelConfig, get_preset
from glmkit.layers import Rotary, rope_cos_sin, rotate_halves, rotate_interleaved
from glmkit.model import GLM
from tests.helpers import assert_close, assert_differs, assert_equal

TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=64, init_std=0.2)

# One tiny model per family member; together they cover every position scheme, GQA, both norms,
# both residuals, both MLPs, sandwich norms, all biases and tied / untied heads.
VARIANTS = {
    # original GLM: learned 2D positions, LayerNorm, GELU, all biases, tied head
    "glm_learned2d": dict(position="learned_2d", norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True),
    # ChatGLM-6B: 2D RoPE, LayerNorm, deepnorm residual, GELU, biases, separate head
    "chatglm_rope2d_deepnorm": dict(
        position="rope_2d", norm="layernorm", residual="deepnorm", mlp="gelu", qkv_bias=True, out_bias=True,
        mlp_bias=True, tie_embeddings=False,
    ),
    # native glmkit: 2D RoPE with GQA, RMSNorm, SwiGLU
    "native_rope2d_gqa": dict(position="rope_2d", n_kv_heads=2),
    # GLM-4: partial interleaved RoPE, GQA, qkv bias, separate head
    "glm4_partial_gqa": dict(position="rope_partial", n_kv_heads=2, qkv_bias=True, tie_embeddings=False),
    # GLM-4-0414: as GLM-4 plus sandwich norms (here with a single kv head)
    "glm4_0414_sandwich": dict(position="rope_partial", n_kv_heads=1, sandwich_norm=True, qkv_bias=True, tie_embeddings=False),
}
ROPE_VARIANTS = [k for k, v in VARIANTS.items() if v["position"] != "learned_2d"]


def make_model(variant: str, seed: int = 0) -> GLM:
    cfg = ModelConfig(**{**TINY, **VARIANTS[variant]})
    torch.manual_seed(seed)
    model = GLM(cfg).eval()
    with torch.no_grad():  # init leaves biases 0 and norms 1; move them so their code paths count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
    return model


def glm_position_ids(seps: list[int], T: int) -> torch.Tensor:
    """GLM 2D positions (B, 2, T): Part A (i < sep) counts 0..sep-1 with block position 0; Part B
    tokens all share the position of their [MASK] (taken as the last Part A token) and count block
    positions 1, 2, 3, ... sep = 0 gives plain positions 0..T-1 with block 0."""
    i = torch.arange(T)
    out = []
    for s in seps:
        if s == 0:
            out.append(torch.stack([i, torch.zeros_like(i)]))
        else:
            out.append(torch.stack([torch.where(i < s, i, s - 1), torch.where(i < s, 0, i - s + 1)]))
    return torch.stack(out)


def position_ids_for(model: GLM, seps: list[int], T: int) -> torch.Tensor:
    """(B, 2, T) GLM positions for schemes that read block positions, else (B, T) 0..T-1."""
    if model.cfg.uses_block_positions and any(seps):
        return glm_position_ids(seps, T)
    return torch.arange(T).expand(len(seps), T)


def rand_ids(model: GLM, *shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(model.cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# ---- 1. KV cache == full forward -------------------------------------------------------------------


@pytest.fixture(params=["eager", "fused"])
def step_path(request, monkeypatch):
    """GLM.step's two ways through a decode step: the eager layers, and the native fused step."""
    if request.param == "eager":
        monkeypatch.setattr(fused, "decode_step", lambda *a, **k: None)
    elif not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.why_unavailable()}")
    return request.param


PROMPT, N_NEW = 8, 6
SEPS = {"causal": [0, 0], "prefix": [6, 3]}  # prefix: a different Part A length per sample


@pytest.mark.parametrize("mode", ["causal", "prefix"])
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_kv_cache_decode_matches_full_forward(variant, mode, step_path):
    model = make_model(variant)
    seps = SEPS[mode]
    B, T = len(seps), PROMPT + N_NEW
    sep = torch.tensor(seps) if mode == "prefix" else 0
    pos = position_ids_for(model, seps, T)  # (B, T) or (B, 2, T)
    ids = rand_ids(model, B, PROMPT)

    # greedy with the cache: prefill the prompt, then N_NEW one-token decode steps
    cache = model.new_cache(B, max_len=T)
    logits = [model.prefill(ids, cache, position_ids=pos[..., :PROMPT], sep=sep)]  # (B, PROMPT, V)
    seq = ids
    for t in range(N_NEW):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)  # (B, 1)
        seq = torch.cat([seq, nxt], dim=1)
        logits.append(model.prefill(nxt, cache, position_ids=pos[..., PROMPT + t : PROMPT + t + 1]))
    cached = torch.cat(logits, dim=1)  # (B, T, V)
    assert cache.length == T

    full = model(seq, pos, sep)
    assert_close(cached, full, 1e-5, f"{variant}/{mode}: cached prefill+decode logits vs full forward")

    # greedy without the cache: re-run the whole sequence each step
    ref = ids
    for _ in range(N_NEW):
        step = model(ref, pos[..., : ref.shape[1]], sep)
        ref = torch.cat([ref, step[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, ref), (
        f"{variant}/{mode}: greedy tokens differ\n  with cache: {seq[:, PROMPT:].tolist()}\n"
        f"  no cache:   {ref[:, PROMPT:].tolist()}"
    )


@pytest.mark.parametrize("variant", ["glm_learned2d", "chatglm_rope2d_deepnorm", "glm4_partial_gqa"])
@torch.no_grad()
def test_chunked_prefill_after_part_a_matches_full_forward(variant):
    """A second prefill chunk (Part B continuation, explicit positions, no sep) == full forward."""
    model = make_model(variant)
    seps, T, first = [5, 3], 11, 6  # first chunk holds all of Part A for both samples
    pos, ids = position_ids_for(model, seps, T), rand_ids(model, 2, T)
    cache = model.new_cache(2, max_len=T)
    a = model.prefill(ids[:, :first], cache, position_ids=pos[..., :first], sep=torch.tensor(seps))
    b = model.prefill(ids[:, first:], cache, position_ids=pos[..., first:])
    full = model(ids, pos, torch.tensor(seps))
    assert_close(torch.cat([a, b], 1), full, 1e-5, f"{variant}: two prefill chunks vs full forward")


@torch.no_grad()
def test_prefill_chunk_shorter_than_sep_is_rejected():
    """A first prefill shorter than sep cannot be right: its Part A queries should also see Part A
    keys that are not in the cache yet (measured before the check existed: max |diff| 3.5 against
    the full forward). prefill refuses it."""
    model = make_model("native_rope2d_gqa")
    seps, T, first = [6, 6], 10, 4
    pos, ids = position_ids_for(model, seps, T), rand_ids(model, 2, T)
    cache = model.new_cache(2, max_len=T)
    with pytest.raises(ValueError, match=r"sep=\[6, 6\] exceeds the 4 tokens of the first prefill"):
        model.prefill(ids[:, :first], cache, position_ids=pos[..., :first], sep=torch.tensor(seps))


@pytest.mark.parametrize("variant", ["chatglm_rope2d_deepnorm", "glm4_partial_gqa"])
@torch.no_grad()
def test_step_rows_at_their_own_slots(variant, step_path):
    """The serving engine's use: prompts prefilled alone and copied into rows of one cache (over a
    longer row's leftovers), then steps where each row writes at its own length, attending up to the
    longest: each row's logits are its full forward's."""
    model = make_model(variant)
    lengths, seps, steps = [3, 7, 5], [2, 0, 5], 3
    cache = model.new_cache(4, max_len=16)
    model.prefill(rand_ids(model, 4, 12, seed=5), cache, sep=4)  # leftovers: keys, valid flags, sep
    seqs = [rand_ids(model, 1, n + steps, seed=20 + b) for b, n in enumerate(lengths)]
    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        one = model.new_cache(1, n)
        model.prefill(seq[:, :n], one, sep=seps[b])
        cache.copy_rows(b, one, 0, n)
    got = []
    for t in range(steps):
        slots = torch.tensor(lengths)[:, None] + t
        got.append(model.step(torch.cat([s[:, n + t : n + t + 1] for s, n in zip(seqs, lengths)]), slots, cache, slots,
                              extent=max(lengths) + t + 1)[:, -1])
    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        want = model(seq, sep=seps[b])[0, n:]
        assert_close(torch.stack([g[b] for g in got]), want, 1e-5, f"{variant}: row {b} (length {n}, sep {seps[b]})")


# ---- 2. prefix mask ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_prefix_mask_part_b_is_invisible_to_part_a(variant):
    model = make_model(variant)
    seps, T = [6, 4], 10
    sep, pos, ids = torch.tensor(seps), position_ids_for(model, seps, T), rand_ids(model, 2, T)
    V = model.cfg.vocab_size
    base = model(ids, pos, sep)
    for b, s in enumerate(seps):
        other = 1 - b
        # change a Part B token: everything before it (all of Part A, earlier Part B) is untouched
        j = s + 1
        ids2 = ids.clone()
        ids2[b, j] = (ids[b, j] + 1) % V
        out = model(ids2, pos, sep)
        assert_equal(out[b, :j], base[b, :j], f"{variant}: sample {b}, positions < {j} after editing Part B token {j}")
        assert_equal(out[other], base[other], f"{variant}: sample {other} after editing sample {b}")
        assert_differs(out[b, j], base[b, j], 1e-6, f"{variant}: the edited position {j} itself")

        # change a Part A token: every Part B position and the Part A positions before it change
        i = 1
        ids3 = ids.clone()
        ids3[b, i] = (ids[b, i] + 1) % V
        out = model(ids3, pos, sep)
        for q in [0, *range(s, T)]:
            assert_differs(out[b, q], base[b, q], 1e-6, f"{variant}: sample {b} position {q} after editing Part A token {i}")


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_sep_zero_is_causal(variant):
    model = make_model(variant)
    T = 9
    ids = rand_ids(model, 2, T)
    base = model(ids, sep=0)
    assert_equal(model(ids), base, f"{variant}: sep=None vs sep=0")
    assert_equal(model(ids, sep=torch.zeros(2, dtype=torch.long)), base, f"{variant}: sep tensor of 0 vs sep=0")
    for j in (T - 1, 2):  # the last token, and one early on: positions before j are untouched
        ids2 = ids.clone()
        ids2[:, j] = (ids[:, j] + 1) % model.cfg.vocab_size
        out = model(ids2, sep=0)
        assert_equal(out[:, :j], base[:, :j], f"{variant}: causal logits before edited token {j}")
        assert_differs(out[:, j], base[:, j], 1e-6, f"{variant}: causal logits at edited token {j}")


# ---- 3. left padding ----------------------------------------------------------------------------------

LENGTHS = [7, 4, 5]


def left_padded(model: GLM, lengths: list[int]):
    """Samples of the given lengths, left-padded with random junk ids, and the attention mask."""
    T = max(lengths)
    samples = [rand_ids(model, n, seed=10 + b) for b, n in enumerate(lengths)]
    ids = rand_ids(model, len(lengths), T, seed=99)  # junk under the padding: masking must hide it
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, (s, n) in enumerate(zip(samples, lengths)):
        ids[b, T - n :], mask[b, T - n :] = s, 1
    return samples, ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_left_padding_matches_unpadded(variant):
    model = make_model(variant)
    samples, ids, mask = left_padded(model, LENGTHS)
    T = ids.shape[1]
    out = model(ids, attention_mask=mask)  # positions from mask.cumsum
    for b, (s, n) in enumerate(zip(samples, LENGTHS)):
        alone = model(s[None])
        assert_close(out[b, T - n :], alone[0], 1e-5, f"{variant}: padded sample {b} (len {n}) vs alone")

    # with a prefix: sep indexes the padded rows, so it is shifted by each sample's padding
    seps = [3, 2, 4]
    out = model(ids, sep=torch.tensor([T - n + s for n, s in zip(LENGTHS, seps)]), attention_mask=mask)
    for b, (s, n) in enumerate(zip(samples, LENGTHS)):
        alone = model(s[None], sep=seps[b])
        assert_close(out[b, T - n :], alone[0], 1e-5, f"{variant}: padded sample {b} with sep {seps[b]} vs alone")


@pytest.mark.parametrize("variant", ["glm_learned2d", "chatglm_rope2d_deepnorm", "glm4_0414_sandwich"])
@torch.no_grad()
def test_left_padded_cache_matches_unpadded(variant):
    model = make_model(variant)
    samples, ids, mask = left_padded(model, LENGTHS)
    B, T, steps = len(LENGTHS), ids.shape[1], 3
    new = rand_ids(model, B, steps, seed=7)  # fixed continuation tokens
    lengths = torch.tensor(LENGTHS)
    cache = model.new_cache(B, max_len=T + steps)
    outs = [model.prefill(ids, cache, attention_mask=mask)]
    for t in range(steps):
        outs.append(model.prefill(new[:, t : t + 1], cache, position_ids=(lengths + t)[:, None]))
    got = torch.cat(outs, 1)  # (B, T + steps, V)
    for b, (s, n) in enumerate(zip(samples, LENGTHS)):
        alone = model(torch.cat([s, new[b]])[None])
        assert_close(got[b, T - n :], alone[0], 1e-5, f"{variant}: padded cached sample {b} (len {n}) vs alone")


# ---- 4. rotary properties ------------------------------------------------------------------------

HD = 16  # head dim of the rotary property tests
ROPE_2D = ModelConfig(dim=4 * HD, n_heads=4, position="rope_2d")  # two rotary halves of 8 channels
FIRST, SECOND = slice(0, HD // 2), slice(HD // 2, HD)
# The relative property is exact in real arithmetic; the slack covers fp32 rounding of angles up
# to ~500 rad (pos * inv_freq is formed in fp32). Measured: max 2.1e-5 over 600 draws.
REL_ATOL = 2e-4
ROPE_SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None)


def qk_pair(seed: int, T: int = 6):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, T, 1, HD, generator=g)  # (B=1, T, heads=1, D) each
    pos = torch.randint(0, 100, (1, T), generator=g)
    block = torch.randint(0, 100, (1, T), generator=g)
    return q, k, pos, block


def dots(rot: Rotary, q, k, channels: slice) -> torch.Tensor:
    """q_i . k_j over `channels` after rotation: (T, T)."""
    return rot(q)[0, :, 0, channels] @ rot(k)[0, :, 0, channels].T


@ROPE_SETTINGS
@given(shift=st.integers(1, 400), seed=st.integers(0, 10_000))
def test_rope_2d_position_half_is_relative(shift, seed):
    q, k, pos, block = qk_pair(seed)
    base = Rotary(ROPE_2D, pos, block, torch.float32)
    moved = Rotary(ROPE_2D, pos + shift, block, torch.float32)
    assert_close(dots(moved, q, k, FIRST), dots(base, q, k, FIRST), REL_ATOL, f"rope_2d first-half q.k, positions +{shift}")
    assert_equal(moved(q)[..., SECOND], base(q)[..., SECOND], f"rope_2d second half, positions +{shift}")


@ROPE_SETTINGS
@given(shift=st.integers(1, 400), seed=st.integers(0, 10_000))
def test_rope_2d_block_half_is_relative(shift, seed):
    q, k, pos, block = qk_pair(seed)
    base = Rotary(ROPE_2D, pos, block, torch.float32)
    moved = Rotary(ROPE_2D, pos, block + shift, torch.float32)
    assert_close(dots(moved, q, k, SECOND), dots(base, q, k, SECOND), REL_ATOL, f"rope_2d second-half q.k, blocks +{shift}")
    assert_equal(moved(q)[..., FIRST], base(q)[..., FIRST], f"rope_2d first half, block positions +{shift}")
    assert_equal(dots(moved, q, k, FIRST), dots(base, q, k, FIRST), f"rope_2d first-half q.k, blocks +{shift}")


@ROPE_SETTINGS
@given(shift=st.integers(1, 400), seed=st.integers(0, 10_000), fraction=st.sampled_from([0.25, 0.5, 0.75, 1.0]))
def test_rope_partial_is_relative_and_passes_the_rest_through(shift, seed, fraction):
    cfg = ModelConfig(dim=4 * HD, n_heads=4, position="rope_partial", rope_fraction=fraction)
    r = cfg.rotary_dim
    q, k, pos, block = qk_pair(seed)
    base = Rotary(cfg, pos, block, torch.float32)
    moved = Rotary(cfg, pos + shift, block, torch.float32)
    assert_close(dots(moved, q, k, slice(0, r)), dots(base, q, k, slice(0, r)), REL_ATOL, f"rope_partial r={r} q.k, +{shift}")
    assert_equal(base(q)[..., r:], q[..., r:], f"rope_partial r={r}: channels past the rotary dim")
    # block positions are ignored
    assert_equal(Rotary(cfg, pos, block + shift, torch.float32)(q), base(q), "rope_partial with shifted block positions")


def test_rotation_is_orthogonal_and_not_trivial():
    """Guards the relative tests against a no-op rotary: norms kept, equal positions give the plain
    dot product, different positions do not."""
    q, k, _, _ = qk_pair(0)
    for cfg, rotated in ((ROPE_2D, slice(0, HD)), (ModelConfig(dim=4 * HD, n_heads=4, position="rope_partial"), slice(0, 8))):
        same = torch.full((1, 6), 37)
        rot = Rotary(cfg, same, same, torch.float32)
        assert_close(rot(q).norm(dim=-1), q.norm(dim=-1), 1e-5, f"{cfg.position}: |rot(q)| vs |q|")
        plain = q[0, :, 0, rotated] @ k[0, :, 0, rotated].T
        assert_close(dots(rot, q, k, rotated), plain, 1e-4, f"{cfg.position}: q.k at equal positions vs unrotated")
        spread = torch.arange(6)[None] * 5
        assert_differs(dots(Rotary(cfg, spread, spread, torch.float32), q, k, rotated), plain, 1e-2, f"{cfg.position}: q.k at different positions")


def chatglm6b_rotary(x, pos, theta=10000.0):
    """modeling_chatglm.py (ChatGLM-6B): RotaryEmbedding over dim = x.shape[-1], cos/sin of
    cat(freqs, freqs), rotate_half = cat(-x2, x1), applied to one half of the head."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    emb = torch.cat([pos.float()[..., None] * inv_freq] * 2, dim=-1)[:, :, None]  # (B, T, 1, d)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def glm4_hf_rotary(x, pos, rotary_dim, theta=10000.0):
    """HF modeling_glm.py: cos/sin of cat(freqs, freqs), first half repeat_interleave(2),
    interleaved rotate_half = stack(-x[1::2], x[0::2]), on the first rotary_dim channels."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    emb = torch.cat([pos.float()[..., None] * inv_freq] * 2, dim=-1)[:, :, None]
    cos = emb.cos()[..., : rotary_dim // 2].repeat_interleave(2, dim=-1)
    sin = emb.sin()[..., : rotary_dim // 2].repeat_interleave(2, dim=-1)
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    half = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat([xr * cos + half * sin, xp], dim=-1)


def test_rotary_layouts_match_upstream_formulas():
    q, _, pos, block = qk_pair(3)
    got = Rotary(ROPE_2D, pos, block, torch.float32)(q)
    want = torch.cat([chatglm6b_rotary(q[..., FIRST], pos), chatglm6b_rotary(q[..., SECOND], block)], dim=-1)
    assert_close(got, want, 1e-5, "rope_2d vs ChatGLM-6B formula")
    cfg = ModelConfig(dim=4 * HD, n_heads=4, position="rope_partial", rope_fraction=0.5)
    assert_close(Rotary(cfg, pos, block, torch.float32)(q), glm4_hf_rotary(q, pos, 8), 1e-5, "rope_partial vs HF GLM formula")
    # and the building blocks on their own
    cos, sin = rope_cos_sin(pos, 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8), torch.float32)
    assert cos.shape == (1, 6, 1, 4), cos.shape
    assert_close(rotate_halves(q[..., :8], cos, sin), chatglm6b_rotary(q[..., :8], pos), 1e-5, "rotate_halves")
    assert_close(rotate_interleaved(q[..., :8], cos, sin), glm4_hf_rotary(q[..., :8], pos, 8), 1e-5, "rotate_interleaved")


# ---- 5. model-level relative positions ---------------------------------------------------------------


@pytest.mark.parametrize("shift", [1, 29, 300])
@pytest.mark.parametrize("variant", ROPE_VARIANTS)
@torch.no_grad()
def test_rope_model_invariant_to_position_shift(variant, shift):
    model = make_model(variant)
    B, T = 2, 9
    ids = rand_ids(model, B, T)
    pos = torch.stack([torch.arange(T), torch.zeros(T, dtype=torch.long)])[None].expand(B, 2, T)  # (B, 2, T)
    shifted = pos.clone()
    shifted[:, 0] += shift
    base = model(ids, pos)
    assert_close(model(ids, shifted), base, 1e-4, f"{variant}: logits with positions +{shift} vs unshifted")
    spread = pos.clone()
    spread[:, 0] *= 3  # not a shift: relative distances change, so must the logits
    assert_differs(model(ids, spread), base, 1e-4, f"{variant}: logits with positions x3")


# ---- 6. init and heads -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["glm_learned2d", "glm4_0414_sandwich"])
def test_init_weights_is_deterministic(variant):
    cfg = ModelConfig(**{**TINY, **VARIANTS[variant]})
    torch.manual_seed(1)
    a = GLM(cfg)
    torch.manual_seed(2)
    b = GLM(cfg)
    with torch.no_grad():
        b.embed.weight.add_(1.0)  # whatever state b is in, init_weights(seed) overwrites it
    a.init_weights(seed=123)
    b.init_weights(seed=123)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert_equal(q, p, f"{variant}: {name} after init_weights(123) in two models")
    a.init_weights(seed=123)  # again on the same model: a fresh generator each call
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert_equal(p, q, f"{variant}: {name} after a second init_weights(123)")
    b.init_weights(seed=124)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if name.endswith("bias"):
            assert_equal(p, torch.zeros_like(p), f"{variant}: {name} is zero")
        elif "norm" in name:
            assert_equal(p, torch.ones_like(p), f"{variant}: {name} is one")
        else:
            assert not torch.equal(p, q), f"{variant}: {name} identical for seeds 123 and 124"


@torch.no_grad()
def test_tied_and_untied_heads():
    torch.manual_seed(0)
    base = {**TINY, "position": "rope_partial"}
    tied = GLM(ModelConfig(**base, tie_embeddings=True)).eval()
    untied = GLM(ModelConfig(**base, tie_embeddings=False)).eval()
    names_tied = {n for n, _ in tied.named_parameters()}
    names_untied = {n for n, _ in untied.named_parameters()}
    assert not any(n.startswith("head") for n in names_tied), sorted(names_tied)
    assert not hasattr(tied, "head")
    assert names_untied - names_tied == {"head.weight"}, sorted(names_untied ^ names_tied)
    V, C = TINY["vocab_size"], TINY["dim"]
    assert untied.head.weight.shape == (V, C)
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()
    assert not torch.equal(untied.head.weight, untied.embed.weight)
    n_tied, n_untied = (sum(p.numel() for p in m.parameters()) for m in (tied, untied))
    assert n_untied - n_tied == V * C, (n_tied, n_untied)

    ids = torch.randint(V, (2, 5))
    for model, weight in ((tied, tied.embed.weight), (untied, untied.head.weight)):
        final = {}
        h = model.norm.register_forward_hook(lambda m, i, o: final.setdefault("x", o))
        logits = model(ids)
        h.remove()
        assert_close(logits, final["x"] @ weight.T, 1e-5, f"tie_embeddings={model.cfg.tie_embeddings}: logits vs final hidden @ W.T")


# ---- 7. errors -----------------------------------------------------------------------------------------


@torch.no_grad()
def test_prefill_beyond_cache_raises():
    model = make_model("native_rope2d_gqa")
    cache = model.new_cache(1, max_len=8)
    with pytest.raises(ValueError, match=r"\b8 positions"):
        model.prefill(rand_ids(model, 1, 9), cache)
    assert cache.length == 0
    model.prefill(rand_ids(model, 1, 6), cache)
    with pytest.raises(ValueError, match=r"\b8 positions.*6 used.*3 more"):
        model.prefill(rand_ids(model, 1, 3), cache, position_ids=torch.arange(6, 9)[None])
    assert cache.length == 6
    for t in (6, 7):
        model.prefill(rand_ids(model, 1, 1), cache, position_ids=torch.tensor([[t]]))
    with pytest.raises(ValueError, match=r"\b8 positions"):
        model.prefill(rand_ids(model, 1, 1), cache, position_ids=torch.tensor([[8]]))
    assert cache.length == 8


@torch.no_grad()
def test_second_prefill_with_sep_raises():
    model = make_model("chatglm_rope2d_deepnorm")
    cache = model.new_cache(2, max_len=16)
    model.prefill(rand_ids(model, 2, 5), cache, sep=torch.tensor([3, 4]))
    for sep in (1, 0, torch.tensor([3, 4])):
        with pytest.raises(ValueError, match="sep"):
            model.prefill(rand_ids(model, 2, 2), cache, position_ids=torch.arange(5, 7).expand(2, 2), sep=sep)
    assert cache.length == 5
    assert cache.sep.tolist() == [3, 4]


@torch.no_grad()
def test_continuing_cache_without_positions_raises():
    model = make_model("glm4_partial_gqa")
    cache = model.new_cache(1, max_len=16)
    model.prefill(rand_ids(model, 1, 5), cache)
    with pytest.raises(ValueError, match="position_ids"):
        model.prefill(rand_ids(model, 1, 2), cache)
    assert cache.length == 5


def test_long_cpu_prefill_returns_the_heaps_free_pages(monkeypatch):
    """A step of LARGE_STEP tokens or more on CPU hands glibc's freed pages back (model._trim_after), a decode
    step does not (a few ms of malloc_trim per token would show); the logits are the same either way."""
    import glmkit.model as gm

    calls = []
    monkeypatch.setattr(gm, "release_freed_heap", lambda: calls.append(1))
    monkeypatch.setattr(gm, "LARGE_STEP", 12)
    model = GLM(get_preset("debug")).eval()
    with torch.no_grad():
        cache = model.new_cache(1, 32)
        model.prefill(torch.arange(1, 13)[None], cache)
        assert calls == [1]
        model.prefill(torch.tensor([[5]]), cache, position_ids=torch.tensor([[[12], [0]]])[:, 0])
        assert calls == [1]
