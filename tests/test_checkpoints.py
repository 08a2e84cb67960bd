"""Safe checkpoint loading: containers, prefixes, steps, and files that must not load."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from dynascope.commands.checkpoints import (
    KeyMismatchError,
    NotACheckpointError,
    UnsafeCheckpointError,
    extract_state_dict,
    find_checkpoints,
    load_checkpoint,
    match_state_dict,
    step_from_name,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


class _Evil:
    """Unpickling this writes a marker file: proof that code from the file ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("container", ["bare", "state_dict", "model", "model_state_dict"])
def test_containers(tmp_path, container: str) -> None:
    sd = _model().state_dict()
    obj = sd if container == "bare" else {container: sd, "optimizer": {"state": {}}, "global_step": 7}
    torch.save(obj, tmp_path / "c.pt")
    ck = load_checkpoint(tmp_path / "c.pt")
    assert _same(ck.state_dict, dict(sd))
    assert ck.container == container
    if container != "bare":
        assert (ck.step, ck.step_source) == (7, "file key 'global_step'")


def test_lightning_ckpt_with_prefix_and_epoch(tmp_path) -> None:
    sd = {f"model.{k}": v for k, v in _model().state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.1.0",
                "hyper_parameters": {"lr": 0.1}}, tmp_path / "epoch=3-step=120.ckpt")
    ck = load_checkpoint(tmp_path / "epoch=3-step=120.ckpt")
    assert ck.step == 120 and "global_step" in ck.step_source
    model = _model()
    matched, stripped = match_state_dict(ck.state_dict, model)
    assert stripped == ["model."]
    model.load_state_dict(matched)


def test_ddp_and_compile_prefixes(tmp_path) -> None:
    sd = {f"module._orig_mod.{k}": v for k, v in _model().state_dict().items()}
    matched, stripped = match_state_dict(sd, _model())
    assert stripped == ["module.", "_orig_mod."]
    assert set(matched) == set(_model().state_dict())


def test_key_mismatch_lists_first_keys() -> None:
    sd = _model().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["2.bias"]
    with pytest.raises(KeyMismatchError, match=r"missing 1 \(first: 2.bias\).*unexpected 1 \(first: extra.weight\)"):
        match_state_dict(sd, _model())
    sd = _model().state_dict()
    sd["0.weight"] = torch.zeros(5, 4)
    with pytest.raises(KeyMismatchError, match=r"shape mismatch 1 \(first: 0.weight \(5, 4\) vs model \(3, 4\)\)"):
        match_state_dict(sd, _model())


def test_step_from_name() -> None:
    assert step_from_name("ckpt_000500.pt") == 500
    assert step_from_name("epoch=3-step=1200.ckpt") == 1200
    assert step_from_name("model-epoch12.pth") == 12
    assert step_from_name("final.pt") is None


def test_step_from_name_and_no_step(tmp_path) -> None:
    torch.save(_model().state_dict(), tmp_path / "weights_250.pt")
    ck = load_checkpoint(tmp_path / "weights_250.pt")
    assert (ck.step, ck.step_source) == (250, "file name")
    torch.save(_model().state_dict(), tmp_path / "final.pt")
    ck = load_checkpoint(tmp_path / "final.pt")
    assert (ck.step, ck.step_source) == (None, "")


def test_tensor_step_value(tmp_path) -> None:
    torch.save({"state_dict": _model().state_dict(), "step": torch.tensor(42)}, tmp_path / "a.pt")
    assert load_checkpoint(tmp_path / "a.pt").step == 42


def test_malicious_pickle_does_not_execute_without_trust(tmp_path) -> None:
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": _model().state_dict(), "payload": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="trust"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    # a plain pickle (not torch.save) is refused too
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"w": _Evil(str(marker))}, f)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()
    # with explicit trust it is unpickled (and the payload runs: that is what trust means)
    ck = load_checkpoint(tmp_path / "evil.pt", trust=True)
    assert marker.exists() and ck.trusted


def test_corrupt_empty_and_missing_files(tmp_path) -> None:
    torch.save(_model().state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint at all")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("trunc.pt", "text.pt", "empty.pt", "missing.pt"):
        with pytest.raises(NotACheckpointError, match=name):
            load_checkpoint(tmp_path / name)


def test_no_state_dict_in_file(tmp_path) -> None:
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, tmp_path / "opt.pt")
    with pytest.raises(NotACheckpointError, match="no state dict found.*top-level keys: \\['optimizer', 'epoch'\\]"):
        load_checkpoint(tmp_path / "opt.pt")
    with pytest.raises(NotACheckpointError):
        extract_state_dict([1, 2, 3])


def test_safetensors_file_and_hf_directory(tmp_path) -> None:
    st = pytest.importorskip("safetensors.torch")
    sd = {k: v.contiguous() for k, v in _model().state_dict().items()}
    st.save_file(sd, str(tmp_path / "w.safetensors"), metadata={"step": "33"})
    ck = load_checkpoint(tmp_path / "w.safetensors")
    assert _same(ck.state_dict, sd) and ck.step == 33 and "safetensors metadata" in ck.step_source
    hf = tmp_path / "checkpoint-500"
    hf.mkdir()
    st.save_file(sd, str(hf / "model.safetensors"))
    (hf / "config.json").write_text("{}")
    ck = load_checkpoint(hf)
    assert _same(ck.state_dict, sd) and ck.step == 500
    (hf / "trainer_state.json").write_text('{"global_step": 501}')
    assert load_checkpoint(hf).step == 501
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(NotACheckpointError, match="safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_hf_pytorch_model_bin_and_shards(tmp_path) -> None:
    sd = _model().state_dict()
    d = tmp_path / "hf"
    d.mkdir()
    torch.save(dict(sd), d / "pytorch_model.bin")
    assert _same(load_checkpoint(d).state_dict, dict(sd))
    s = tmp_path / "sharded"
    s.mkdir()
    keys = list(sd)
    torch.save({k: sd[k] for k in keys[:2]}, s / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in keys[2:]}, s / "pytorch_model-00002-of-00002.bin")
    import json

    (s / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        k: ("pytorch_model-00001-of-00002.bin" if i < 2 else "pytorch_model-00002-of-00002.bin")
        for i, k in enumerate(keys)}}))
    assert _same(load_checkpoint(s).state_dict, dict(sd))


def test_find_checkpoints(tmp_path) -> None:
    torch.save(_model().state_dict(), tmp_path / "a_1.pt")
    torch.save(_model().state_dict(), tmp_path / "b_2.pth")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "checkpoint-3").mkdir()
    torch.save(_model().state_dict(), tmp_path / "checkpoint-3" / "pytorch_model.bin")
    found = find_checkpoints([tmp_path])
    assert [p.name for p in found] == ["a_1.pt", "b_2.pth", "checkpoint-3"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotACheckpointError, match="no checkpoints in directory"):
        find_checkpoints([empty])
    with pytest.raises(NotACheckpointError, match="does not exist"):
        find_checkpoints([tmp_path / "nope"])
    assert len(find_checkpoints([tmp_path / "a_1.pt", tmp_path / "a_1.pt"])) == 1


def test_missing_safetensors_package_message(tmp_path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError("no safetensors")
        return real_import(name, *args, **kwargs)

    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 16)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    from dynascope.commands.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="pip install safetensors"):
        load_checkpoint(tmp_path / "w.safetensors")
    assert os.path.exists(tmp_path / "w.safetensors")
