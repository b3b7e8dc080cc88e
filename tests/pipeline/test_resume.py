"""Resumable calibration in the library: a run interrupted after any block and resumed from its state equals an
uninterrupted run bit for bit (weights, QTensors, static activation scales), and bad states are one-line errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import parse_spec
from lowbit.formats.activation import parse_activation_spec
from lowbit.model.act_quant import input_quantizers
from lowbit.pipeline import resume
from lowbit.pipeline.calibrated import quantize_calibrated
from lowbit.pipeline.resume import BlockState, Fingerprint, make_fingerprint
from lowbit.recipe import Recipe, Rule
from tests.arch_models import lowbit_model
from tests.kill_points import Killed, die_after_block




def _recipe(method: str = "smoothquant+gptq") -> Recipe:
    rule = Rule(("Linear",), parse_spec("int4:g32:asym"), parse_activation_spec("int8:tensor:static"))
    return Recipe(scheme="W4A8", method=method, rules=(rule,))


def _ids() -> torch.Tensor:
    return torch.randint(3, 512, (6, 32), generator=torch.Generator().manual_seed(0))


def _fingerprint(recipe: Recipe, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> Fingerprint:
    return make_fingerprint({"path": "tiny"}, recipe, ids, 4, dtype, stream=False)


def _run(folder, resume_: bool, family: str = "llama", recipe: Recipe | None = None,
         dtype: torch.dtype = torch.float32):
    recipe, ids = recipe or _recipe(), _ids()
    state = BlockState.open(folder, _fingerprint(recipe, ids, dtype), resume_)
    model = lowbit_model(family)
    return quantize_calibrated(model, recipe, ids, batch_size=4, progress=False, state=state, compute_dtype=dtype)


def _assert_identical(a, b) -> None:
    assert list(a.qtensors) == list(b.qtensors)
    for name, qa in a.qtensors.items():
        qb = b.qtensors[name]
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scales, qb.scales), name
        assert (qa.zeros is None) == (qb.zeros is None) and (qa.zeros is None or torch.equal(qa.zeros, qb.zeros))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert list(a.float_tensors) == list(b.float_tensors)
    assert all(torch.equal(t, b.float_tensors[k]) for k, t in a.float_tensors.items())
    assert {n: float(q.scale) for n, q in input_quantizers(a.model).items()} == \
           {n: float(q.scale) for n, q in input_quantizers(b.model).items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_resumed_after_each_block_equals_uninterrupted(tmp_path, monkeypatch, family):
    """Two blocks: killed after the first, and after the last (before the outside-block tensors and the cast)."""
    reference = _run(tmp_path / "ref.calib-state", False, family)
    assert len(input_quantizers(reference.model)) == 14
    for block in (0, 1):
        folder = tmp_path / f"k{block}.calib-state"
        with monkeypatch.context() as m:
            die_after_block(m, block)
            with pytest.raises(Killed):
                _run(folder, False, family)
        assert json.loads((folder / "state.json").read_text())["blocks_done"] == block + 1
        assert sorted(p.name for p in folder.glob("inputs-*")) == [f"inputs-{block:05d}.safetensors"]
        _assert_identical(_run(folder, True, family), reference)


def test_a_state_of_other_inputs_is_refused_with_what_differs(tmp_path, monkeypatch):
    folder = tmp_path / "s.calib-state"
    with monkeypatch.context() as m:
        die_after_block(m, 0)
        with pytest.raises(Killed):
            _run(folder, False)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(LowbitError, match="another recipe or calibration options; ") as err:
        _run(folder, True, recipe=_recipe("gptq"))
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    other = make_fingerprint({"path": "other"}, _recipe(), _ids() + 1, 4, torch.float32, stream=False)
    with pytest.raises(LowbitError, match="another model and calibration data;"):
        BlockState.open(folder, other, resume=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_the_fingerprint_covers_tokens_batching_recipe_options_and_precision():
    recipe, ids = _recipe(), _ids()
    base = _fingerprint(recipe, ids)
    changed = [
        make_fingerprint({"path": "tiny"}, recipe, ids, 2, torch.float32, stream=False),
        make_fingerprint({"path": "tiny"}, Recipe(**{**recipe.__dict__, "options": {"damp": 0.1}}), ids, 4,
                         torch.float32, stream=False),
        make_fingerprint({"path": "tiny"}, recipe, ids, 4, torch.bfloat16, stream=False),
        make_fingerprint({"path": "tiny"}, recipe, ids.flip(0), 4, torch.float32, stream=False),
    ]
    assert [c.differences(base) for c in changed] == [["data"], ["recipe"], ["recipe"], ["data"]]
    assert _fingerprint(recipe, ids.clone()) == base


def test_source_identity_sees_a_rewritten_weight_file(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 10)
    before = resume.source_identity(tmp_path)
    weights.write_bytes(b"y" * 11)
    assert resume.source_identity(tmp_path) != before


def test_a_kill_between_a_block_file_and_its_commit_resumes_from_the_previous_block(tmp_path, monkeypatch):
    reference = _run(tmp_path / "ref.calib-state", False)
    folder = tmp_path / "s.calib-state"
    write = resume._write_atomic

    def die_before_committing_block_1(path, data):
        if json.loads(data)["blocks_done"] == 2:
            raise Killed
        write(path, data)

    with monkeypatch.context() as m:
        m.setattr(resume, "_write_atomic", die_before_committing_block_1)
        with pytest.raises(Killed):
            _run(folder, False)
    assert json.loads((folder / "state.json").read_text())["blocks_done"] == 1
    assert {"block-00001.safetensors", "inputs-00000.safetensors", "inputs-00001.safetensors"} <= \
           {p.name for p in folder.iterdir()}, "the uncommitted block's files are there, and the committed inputs"
    _assert_identical(_run(folder, True), reference)
    assert [p.name for p in folder.glob("inputs-*")] == ["inputs-00001.safetensors"], "only the latest inputs are kept"


def test_resume_without_a_state_starts_from_the_first_block_and_a_fresh_run_keeps_an_old_state_until_it_saves(
        tmp_path, caplog):
    fingerprint = _fingerprint(_recipe(), _ids())
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        assert BlockState.open(tmp_path / "none.calib-state", fingerprint, resume=True).done == 0
        old = tmp_path / "old.calib-state"
        old.mkdir()
        (old / "state.json").write_text("{}")
        fresh = BlockState.open(old, fingerprint, resume=False)
    assert "no calibration state" in caplog.text and "replacing the calibration state" in caplog.text
    assert fresh.done == 0 and (old / "state.json").read_text() == "{}"


@pytest.mark.parametrize("scheme", ["W4A16", "W4A8"])
def test_a_bf16_run_saves_the_hidden_states_it_holds_and_resumes_exactly(tmp_path, monkeypatch, scheme):
    """A plain bf16 pass (W4A16) holds bf16 hidden states: the state stores them so, in half the bytes. A block with
    input quantizers (W4A8) runs under autocast, whose outputs are fp32 values bf16 cannot hold: they are stored
    as they are, since rounding them would change what the resumed run's next block reads. Either way the state
    holds exactly the run's outputs, and a resumed run equals the uninterrupted one bit for bit."""
    from safetensors import safe_open

    import lowbit.pipeline.calibrated as calibrated

    recipe = _recipe("gptq")
    if scheme == "W4A16":
        recipe = Recipe(scheme="W4A16", method="gptq", rules=(Rule(("Linear",), parse_spec("int4:g32:asym"), None),))
    reference = _run(tmp_path / "ref.calib-state", False, recipe=recipe, dtype=torch.bfloat16)
    folder, held = tmp_path / "k0.calib-state", {}
    save = calibrated._save

    def keep_outputs(run, state, block, index, block_prefix, outputs):
        held[index] = [o.hidden.clone() for o in outputs]
        save(run, state, block, index, block_prefix, outputs)

    with monkeypatch.context() as m:
        m.setattr(calibrated, "_save", keep_outputs)
        die_after_block(m, 0)
        with pytest.raises(Killed):
            _run(folder, False, recipe=recipe, dtype=torch.bfloat16)
    with safe_open(str(folder / "inputs-00000.safetensors"), framework="pt") as f:
        stored = [f.get_tensor(k) for k in sorted(f.keys())]
    assert {t.dtype for t in stored} == {torch.bfloat16 if scheme == "W4A16" else torch.float32}
    assert len(stored) == len(held[0]) and all(torch.equal(t, h) for t, h in zip(stored, held[0]))
    _assert_identical(_run(folder, True, recipe=recipe, dtype=torch.bfloat16), reference)
