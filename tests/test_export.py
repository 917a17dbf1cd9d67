"""Export to HF and ONNX, and the device / dtype policy."""

import pytest
import torch

import glmkit
from glmkit.cli import main
from glmkit.convert import write_checkpoint
from glmkit.devices import resolve_device, resolve_dtype
from tests.helpers import assert_close


def test_hf_export_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = glmkit.load("debug").eval()
    write_checkpoint(model, tmp_path / "ck")
    assert main(["export", str(tmp_path / "ck"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert_close(hf(ids).logits, model(ids), 1e-5, "transformers AutoModel on glmkit export --format hf")


@pytest.mark.slow  # torch.onnx's dynamo exporter takes 30-100 s on 2 cores
def test_onnx_prefill_and_decode_match_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from glmkit.export import export_onnx

    torch.manual_seed(0)
    model = glmkit.load("debug").eval()
    pre, dec = export_onnx(model, tmp_path / "onnx")
    sp, sd = ort.InferenceSession(str(pre)), ort.InferenceSession(str(dec))
    B, T = 3, 9  # other shapes than the export's sample inputs: the axes are dynamic
    ids = torch.randint(0, 512, (B, T))
    pos = torch.stack((torch.arange(T).expand(B, T), torch.zeros(B, T, dtype=torch.long)), 1)
    sep = torch.tensor([4, 0, 9])  # prefix-LM, causal, fully bidirectional
    logits, k, v = sp.run(None, {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "sep": sep.numpy()})
    with torch.no_grad():
        cache = model.new_cache(B, 32)
        ref = model.prefill(ids, cache, pos, sep)
    assert_close(torch.from_numpy(logits), ref, 1e-4, "ONNX prefill")
    tok = ref[:, -1].argmax(-1, keepdim=True)
    for s in range(10):
        p = torch.stack((torch.full((B, 1), T + s), torch.zeros(B, 1, dtype=torch.long)), 1)
        logits, k, v = sd.run(None, {"input_ids": tok.numpy(), "position_ids": p.numpy(), "sep": sep.numpy(),
                                     "past_keys": k, "past_values": v})
        with torch.no_grad():
            ref = model.prefill(tok, cache, p)
        assert_close(torch.from_numpy(logits), ref, 1e-4, f"ONNX decode step {s}")
        tok = ref[:, -1].argmax(-1, keepdim=True)


def test_device_policy_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps", "xpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="--device npu needs the PyTorch plugin 'torch_npu', which is not installed"):
        resolve_device("npu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="this PyTorch build sees no cuda device"):
            resolve_device("cuda")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="fp16 on CPU"):
        resolve_dtype("fp16", torch.device("cpu"))
