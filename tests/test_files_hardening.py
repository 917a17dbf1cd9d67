"""A checkpoint directory is untrusted input: its files stay inside it, its config.json is checked
field by field, and every mistake is one line from the CLI, never a traceback.

    .venv/bin/python -m pytest tests/test_files_hardening.py -q

Each checkpoint here is the random-init `debug` preset written by glmkit itself (a few hundred KB).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import glmkit
from glmkit.cli import main
from glmkit.convert import CheckpointError, read_checkpoint, write_checkpoint


@pytest.fixture
def ck(tmp_path) -> Path:
    return write_checkpoint(glmkit.load("debug"), tmp_path / "ck")


def hf_native(tmp_path) -> Path:
    """The debug model in GlmForCausalLM's layout, with HF's own config fields only (no glmkit_config)."""
    from glmkit.config import get_preset
    from glmkit.model import GLM

    path = write_checkpoint(GLM(get_preset("debug", position="rope_partial")), tmp_path / "hf", "glm_hf")
    assert "glmkit_config" not in json.loads((path / "config.json").read_text())
    return path


def cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr of `glmkit ARGV`, run in-process."""
    code = main(list(argv))
    return code, capsys.readouterr().err


# ---- files stay inside the checkpoint directory --------------------------------------------------
def test_shard_index_pointing_outside_is_refused(ck, tmp_path):
    # a valid weight file outside the directory: before, the index made glmkit load it as if its own
    outside = tmp_path / "outside.safetensors"
    os.rename(ck / "model.safetensors", outside)
    names = list(glmkit.load("debug").state_dict())
    index = {"metadata": {}, "weight_map": {n: "../outside.safetensors" for n in names}}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard \(listed in model.safetensors.index.json\) "
                                              r"'\.\./outside\.safetensors' points outside the checkpoint directory"):
        read_checkpoint(ck)
    # an absolute path is the same escape
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {names[0]: str(outside)}}))
    with pytest.raises(CheckpointError, match="points outside the checkpoint directory"):
        read_checkpoint(ck)


def test_refusal_says_nothing_about_the_outside_file(ck, tmp_path):
    # /etc/passwd in the report: before, glmkit opened it and printed its size in a "truncated" error
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 37)
    rel = os.path.relpath(secret, ck)
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"embed.weight": rel}}))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(ck)
    msg = str(e.value)
    size = secret.stat().st_size
    assert "points outside" in msg and str(size) not in msg and "truncated" not in msg and "bytes" not in msg, msg
    # a link to a file that does not exist reads the same as one to a file that does
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"embed.weight": "../nothing-here"}}))
    with pytest.raises(CheckpointError, match="points outside") as e2:
        read_checkpoint(ck)
    assert "not in" not in str(e2.value), str(e2.value)


def test_symlinked_weight_file_pointing_outside_is_refused(ck, tmp_path):
    outside = tmp_path / "elsewhere" / "model.safetensors"
    outside.parent.mkdir()
    os.rename(ck / "model.safetensors", outside)
    (ck / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="weight file 'model.safetensors' points outside the checkpoint directory"):
        read_checkpoint(ck)
    # the same for a shard of a sharded checkpoint
    (ck / "model.safetensors").unlink()
    (ck / "model-00001-of-00001.safetensors").symlink_to(outside)
    names = list(glmkit.load("debug").state_dict())
    (ck / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    with pytest.raises(CheckpointError, match="'model-00001-of-00001.safetensors' points outside"):
        read_checkpoint(ck)


def test_symlinks_inside_the_directory_and_the_hub_cache_layout_load(ck, tmp_path):
    want = read_checkpoint(ck).state_dict()["embed.weight"]
    # a link that stays inside is fine
    (ck / "weights").mkdir()
    os.rename(ck / "model.safetensors", ck / "weights" / "real.safetensors")
    (ck / "model.safetensors").symlink_to("weights/real.safetensors")
    assert torch.equal(read_checkpoint(ck).state_dict()["embed.weight"], want)
    # the Hugging Face hub cache: snapshots/REV/ files are links into the repository's blobs/
    repo = tmp_path / "models--someone--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for name, blob in (("config.json", "aaa"), ("model.safetensors", "bbb")):
        os.rename(ck / ("weights/real.safetensors" if name == "model.safetensors" else name), repo / "blobs" / blob)
        (snap / name).symlink_to(Path("..", "..", "blobs", blob))
    assert torch.equal(read_checkpoint(snap).state_dict()["embed.weight"], want)


def test_convert_does_not_copy_an_outside_tokenizer_file(ck, tmp_path, capsys):
    secret = tmp_path / "secret.json"
    secret.write_text('{"not": "a tokenizer"}')
    (ck / "tokenizer.json").symlink_to(secret)
    code, err = cli(capsys, "convert", str(ck), str(tmp_path / "out"))
    assert code == 1 and "tokenizer file 'tokenizer.json' points outside" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="tokenizer file 'tokenizer.json' points outside"):
        glmkit.load_tokenizer(ck)


# ---- config.json is checked, errors name the field, the CLI prints one line -------------------------
@pytest.mark.parametrize("command", ["info", "convert"])
def test_config_that_is_a_list_is_one_line(ck, tmp_path, capsys, command):
    (ck / "config.json").write_text("[1, 2, 3]")
    code, err = cli(capsys, command, str(ck), *([str(tmp_path / "out")] if command == "convert" else []))
    assert code == 1, (code, err)
    assert err.count("\n") == 1 and err.startswith(f"glmkit {command}: error: "), err
    assert "config.json must hold a JSON object" in err and "list" in err, err


@pytest.mark.parametrize("command", ["info", "convert"])
@pytest.mark.parametrize("field, value, says", [
    ("hidden_size", "big", "field 'hidden_size' must be an integer, got 'big'"),
    ("num_hidden_layers", 0, "field 'num_hidden_layers' must be a positive integer, got 0"),
    ("intermediate_size", True, "field 'intermediate_size' must be an integer, got True"),
    ("rms_norm_eps", "tiny", "field 'rms_norm_eps' must be a number, got 'tiny'"),
    ("rope_parameters", [1], "field 'rope_parameters' must be a JSON object"),
    ("architectures", "GlmForCausalLM", "field 'architectures' must be a list of class names"),
])
def test_hf_config_field_of_the_wrong_type_names_it(tmp_path, capsys, command, field, value, says):
    path = hf_native(tmp_path)
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, field: value}))
    code, err = cli(capsys, command, str(path), *([str(tmp_path / "out")] if command == "convert" else []))
    assert code == 1 and err.count("\n") == 1 and says in err, (code, err)


@pytest.mark.parametrize("field, value, says", [
    ("dim", "big", "ModelConfig.dim must be an integer, got 'big'"),
    ("n_layers", -2, "ModelConfig.n_layers must be positive, got -2"),
    ("max_seq_len", 0, "ModelConfig.max_seq_len must be positive, got 0"),
    ("rope_theta", None, "ModelConfig.rope_theta must be a number, got None"),
    ("qkv_bias", "no", "ModelConfig.qkv_bias must be true or false, got 'no'"),
])
def test_glmkit_config_field_of_the_wrong_type_names_it(ck, capsys, field, value, says):
    d = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**d, field: value}))
    code, err = cli(capsys, "info", str(ck))
    assert code == 1 and err.count("\n") == 1 and says in err, (code, err)
    with pytest.raises(ValueError, match=says):  # the API raises a ValueError too (ConfigError is both)
        read_checkpoint(ck)


def test_no_traceback_from_the_console_entry_point(ck):
    (ck / "config.json").write_text(json.dumps({"model_type": "glmkit", "dim": "big"}))
    r = subprocess.run([sys.executable, "-m", "glmkit", "info", str(ck)], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "ModelConfig.dim" in r.stderr, r.stderr


# ---- a path that does not exist says so ---------------------------------------------------------
@pytest.mark.parametrize("argv", [["info", "{p}"], ["convert", "{p}", "{p}-out"],
                                  ["fill", "--model", "{p}", "a [MASK] b"], ["generate", "--model", "{p}", "--prompt", "hi"]])
def test_nonexistent_model_path_says_it_does_not_exist(tmp_path, capsys, argv):
    p = str(tmp_path / "nonexistent")
    code, err = cli(capsys, *(a.format(p=p) for a in argv))
    assert code == 1 and f"{p} does not exist" in err and "has no tokenizer.json" not in err, (code, err)


# ---- glmkit info --verify ----------------------------------------------------------------------------
def test_info_verify_reports_a_truncated_file(ck, capsys):
    code = main(["info", "--verify", str(ck)])
    out = capsys.readouterr().out
    assert code == 0 and "verified:   1 weight file(s), 14 tensors" in out, out
    f = ck / "model.safetensors"
    full = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(full - 1000)
    code, err = cli(capsys, "info", "--verify", str(ck))
    assert code == 1, (code, err)
    assert f"{f}: truncated safetensors file: tensors need {full} bytes, file has {full - 1000}" in err, err
    # without --verify, info says the files were not checked rather than calling them fine
    code, out = main(["info", str(ck)]), capsys.readouterr().out
    assert code == 0 and "not checked" in out and "verified" not in out, out


def test_info_verify_reports_extra_bytes_and_every_damaged_shard(ck, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    sd = load_file(ck / "model.safetensors")
    names = sorted(sd)
    half = len(names) // 2
    (ck / "model.safetensors").unlink()
    save_file({n: sd[n] for n in names[:half]}, ck / "a.safetensors")
    save_file({n: sd[n] for n in names[half:]}, ck / "b.safetensors")
    (ck / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "a.safetensors" if i < half else "b.safetensors" for i, n in enumerate(names)}}))
    code = main(["info", "--verify", str(ck)])
    out = capsys.readouterr().out
    assert code == 0 and "verified:   2 weight file(s)" in out, out
    size_a, size_b = (ck / "a.safetensors").stat().st_size, (ck / "b.safetensors").stat().st_size
    with open(ck / "a.safetensors", "ab") as fh:
        fh.write(b"\0" * 16)
    with open(ck / "b.safetensors", "r+b") as fh:
        fh.truncate(size_b - 8)
    code, err = cli(capsys, "info", "--verify", str(ck))
    lines = err.splitlines()
    assert code == 1 and len(lines) == 2, err
    assert f"a.safetensors: 16 bytes after the last tensor: tensors need {size_a} bytes, file has {size_a + 16}" in lines[0]
    assert f"b.safetensors: truncated safetensors file: tensors need {size_b} bytes, file has {size_b - 8}" in lines[1]


def test_info_verify_reports_missing_tensors(ck, capsys):
    from safetensors.torch import load_file, save_file

    sd = load_file(ck / "model.safetensors")
    del sd["layers.1.mlp.down.weight"]
    save_file(sd, ck / "model.safetensors")
    code, err = cli(capsys, "info", "--verify", str(ck))
    assert code == 1 and "missing 1 tensor(s), e.g. ['layers.1.mlp.down.weight']" in err, err


def edit_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return cfg


@pytest.mark.parametrize("fmt", ["glmkit", "glm_hf"])
def test_info_verify_checks_shapes_without_reading_data(tmp_path, capsys, fmt):
    """A config.json whose sizes the weights do not have: every loader refuses it, so --verify must too
    (it checked names only and said the checkpoint was fine). HF layout: its q/k/v are joined on meta tensors."""
    path = write_checkpoint(glmkit.load("debug"), tmp_path / "ck") if fmt == "glmkit" else hf_native(tmp_path)
    edit_config(path, vocab_size=json.loads((path / "config.json").read_text())["vocab_size"] + 1)
    code, err = cli(capsys, "info", "--verify", str(path))
    assert code == 1 and "config.json implies" in err and "513" in err, err
    with pytest.raises(CheckpointError, match="config.json implies"):
        read_checkpoint(path)


def test_an_absurd_layer_count_is_refused_before_building_its_layers(ck, capsys):
    """n_layers = 1,000,000 on a 2-layer file: the loaders built a meta model layer by layer first
    (minutes and tens of GB); now the tensor count refuses it at once."""
    edit_config(ck, n_layers=1_000_000)
    for argv in (("info", "--verify", str(ck)), ("convert", str(ck), str(ck.parent / "out"))):
        code, err = cli(capsys, *argv)
        assert code == 1 and "n_layers=1000000, but the weights hold only 14 tensors" in err, (argv, err)
    with pytest.raises(CheckpointError, match="n_layers=1000000"):
        read_checkpoint(ck)
