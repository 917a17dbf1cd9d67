"""Export: HF directories that transformers loads, and ONNX graphs that onnxruntime runs.

    glmkit export SRC DST --format hf        # GlmForCausalLM / Glm4ForCausalLM / Glm4MoeLiteForCausalLM (convert.py)
    glmkit export SRC DST --format onnx      # DST/prefill.onnx, DST/decode.onnx, config, tokenizer

ONNX graphs (opset 18, dynamic batch and lengths):
    prefill.onnx  input_ids (B,T) int64, position_ids (B,2,T) int64, sep (B,) int64
                  -> logits (B,T,V), present_keys / present_values (L,B,K,T,D)
    decode.onnx   input_ids (B,1), position_ids (B,2,1), sep (B,), past_keys / past_values (L,B,K,P,D)
                  -> logits (B,1,V), present_keys / present_values (L,B,K,P+1,D)
Each graph is one `GLM.step`: keys before `sep` are read bidirectionally (GLM's Part A), later
keys causally; the KV cache travels as graph inputs and outputs, so any ONNX
runtime can drive generation. Weights are exported in the model's dtype (fp32 recommended).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .model import GLM, KVCache


class OnnxStep(nn.Module):
    """One `GLM.step` over new tokens after an optional past, the cache travelling as graph tensors:
    past keys and values extended by T free slots, written at P..P+T-1 and returned whole."""

    def __init__(self, model: GLM, with_past: bool):
        super().__init__()
        self.model, self.with_past = model, with_past

    def forward(self, input_ids, position_ids, sep, past_keys=None, past_values=None):
        B, T = input_ids.shape
        cfg, dev = self.model.cfg, input_ids.device
        new = torch.zeros(cfg.n_layers, B, cfg.n_kv_heads, T, cfg.head_dim, dtype=self.model.embed.weight.dtype, device=dev)
        k, v = (torch.cat((past_keys, new), 3), torch.cat((past_values, new), 3)) if self.with_past else (new, new.clone())
        P = k.shape[3] - T
        cache = KVCache(k, v, torch.ones(B, P + T, dtype=torch.bool, device=dev), sep)
        logits = self.model.step(input_ids, position_ids, cache, torch.arange(P, P + T, device=dev).expand(B, T))
        return logits, cache.k, cache.v


def export_onnx(model: GLM, dst: str | Path) -> tuple[Path, Path]:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx and onnxscript packages ({e}); pip install 'glmkit[onnx]'") from None
    if model.cfg.quant:
        raise ValueError("export the float checkpoint to ONNX; weight-only quantized linears use PyTorch CPU kernels")
    if model.cfg.attention != "mha":  # the graphs' cache tensors are (L, B, K, T, D) keys and values of one width
        raise ValueError(f"ONNX export of attention={model.cfg.attention!r} (latent attention) is not supported; "
                         "export it with --format hf")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    cfg = model.cfg
    B, T, P = 2, 5, 7
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    pos = torch.stack((torch.arange(T).expand(B, T), torch.zeros(B, T, dtype=torch.long)), 1)
    sep = torch.tensor([3, 2])
    dt = model.embed.weight.dtype
    past = torch.zeros(cfg.n_layers, B, cfg.n_kv_heads, P, cfg.head_dim, dtype=dt)
    b, t, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    out_pre, out_dec = dst / "prefill.onnx", dst / "decode.onnx"
    with torch.no_grad():
        torch.onnx.export(
            OnnxStep(model, False).eval(), (ids, pos, sep), out_pre, dynamo=True, opset_version=18, external_data=False,
            input_names=["input_ids", "position_ids", "sep"], output_names=["logits", "present_keys", "present_values"],
            dynamic_shapes={"input_ids": {0: b, 1: t}, "position_ids": {0: b, 2: t}, "sep": {0: b}},
        )
        torch.onnx.export(
            OnnxStep(model, True).eval(), (ids[:, :1], pos[..., :1], sep, past, past.clone()), out_dec, dynamo=True,
            opset_version=18, external_data=False,
            input_names=["input_ids", "position_ids", "sep", "past_keys", "past_values"],
            output_names=["logits", "present_keys", "present_values"],
            dynamic_shapes={"input_ids": {0: b}, "position_ids": {0: b}, "sep": {0: b},
                            "past_keys": {1: b, 3: p}, "past_values": {1: b, 3: p}},
        )
    cfg.save(dst / "config.json")
    return out_pre, out_dec


def main(argv=None) -> int:
    from .convert import read_checkpoint, tokenizer_files, write_checkpoint

    ap = argparse.ArgumentParser(prog="glmkit export", description="Export a checkpoint as an HF directory or ONNX graphs.")
    ap.add_argument("src", help="checkpoint directory (any format glmkit reads)")
    ap.add_argument("dst", help="new output directory")
    ap.add_argument("--format", choices=["hf", "onnx"], required=True)
    a = ap.parse_args(argv)
    src = Path(a.src)
    model = read_checkpoint(src)
    extra = tokenizer_files(src)
    if a.format == "hf":
        fmt = "glm4_moe_lite_hf" if model.cfg.attention == "mla" else "glm4_hf" if model.cfg.sandwich_norm else "glm_hf"
        write_checkpoint(model, a.dst, fmt, extra)
        print(f"{src} -> {a.dst} ({fmt}: transformers loads it with AutoModelForCausalLM)")
        return 0
    if model.embed.weight.dtype != torch.float32:
        model = model.float()
    pre, dec = export_onnx(model, a.dst)
    for f in extra:
        shutil.copy2(f, Path(a.dst) / f.name)
    print(f"{src} -> {pre}, {dec}")
    return 0
