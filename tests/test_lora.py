"""LoRA: B = 0 is the base model, merged equals unmerged, adapters round-trip through their files."""

import json

import pytest
import torch

from glmkit.config import get_preset
from glmkit.lora import LoRAConfig, LoRALinear, apply_lora, load_adapters, lora_modules, merge_lora, save_adapters
from glmkit.model import GLM
from tests.helpers import assert_close, assert_differs, assert_equal


def model(seed=0, **kw):
    torch.manual_seed(seed)
    m = GLM(get_preset("debug", **kw))
    m.init_weights(seed=seed)
    return m.eval()


def glm_batch(V=512):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, V, (2, 12), generator=g)
    pos = torch.stack((torch.arange(12).expand(2, 12), torch.zeros(2, 12, dtype=torch.long)), 1)  # (B, 2, T)
    pos[:, 1, 8:] = torch.arange(1, 5)  # a Part B with block positions
    return ids, pos, torch.tensor([8, 6])


def run(m):
    ids, pos, sep = glm_batch()
    with torch.no_grad():
        return m(ids, pos, sep=sep)


def randomize_B(m, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.05)


def test_zero_B_is_the_base_model():
    m = model()
    base = run(m)
    apply_lora(m, LoRAConfig(rank=4, alpha=8))
    assert_equal(run(m), base, "LoRA with B = 0 vs base logits")


def test_merged_equals_unmerged_and_names_come_back():
    m = model()
    names = set(m.state_dict())
    base = run(m)
    apply_lora(m, LoRAConfig(rank=4, alpha=8, targets=("attn.qkv", "attn.out", "mlp.up", "mlp.down")))
    randomize_B(m)
    unmerged = run(m)
    assert_differs(unmerged, base, 1e-3, "adapted vs base logits")
    merge_lora(m)
    assert not lora_modules(m) and set(m.state_dict()) == names, sorted(set(m.state_dict()) ^ names)[:5]
    assert_close(run(m), unmerged, 1e-5, "merged vs unmerged logits")


def test_only_adapters_train():
    m = model()
    apply_lora(m, LoRAConfig(rank=2, targets=("attn.qkv", "mlp.down")))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable), sorted(trainable)
    cfg = m.cfg
    qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    want = cfg.n_layers * 2 * ((cfg.dim + qkv_out) + (cfg.ffn_dim + cfg.dim))
    got = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert got == want, f"trainable parameters: {got}, expected {want}"
    with pytest.raises(ValueError, match="match no linear"):
        apply_lora(model(), LoRAConfig(targets=("attn.nope",)))


def test_adapters_save_load_round_trip(tmp_path):
    m = model()
    apply_lora(m, LoRAConfig(rank=4, alpha=16, dropout=0.1, targets=("attn.qkv", "mlp.up")))
    randomize_B(m)
    m.eval()
    want = run(m)
    save_adapters(m, tmp_path, base_model="debug")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 16 and meta["targets"] == ["attn.qkv", "mlp.up"], meta
    assert len(meta["modules"]) == 2 * m.cfg.n_layers, meta["modules"]

    fresh = load_adapters(model(), tmp_path).eval()  # same base weights, adapters from the files
    assert isinstance(fresh.layers[0].attn.qkv, LoRALinear) and fresh.layers[0].attn.qkv.lora_A.shape[0] == 4
    assert_equal(run(fresh), want, "reloaded adapters vs original logits")

    with pytest.raises(ValueError, match="shape"):
        load_adapters(model(dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64), tmp_path)


def test_dropout_only_in_training():
    m = model()
    apply_lora(m, LoRAConfig(rank=4, dropout=0.5, targets=("mlp.up",)))
    randomize_B(m)
    m.eval()
    a, b = run(m), run(m)
    assert_equal(a, b, "eval mode is deterministic")
    m.train()
    torch.manual_seed(0)
    assert_differs(run(m), a, 1e-6, "dropout on the adapter input in training")
