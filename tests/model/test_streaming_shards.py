"""Larger than memory: sharded Hugging Face folders streamed block by block for every method, the output written
shard by shard, the memory estimate and ``--max-memory``, and one-line errors for broken folders.

The contract of streaming: every method streamed gives bit for bit the QTensors, float tensors and input scales
of the same method in memory, and the sharded output reads back equal.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.model.checkpoint import (INDEX_FILE, WEIGHTS_FILE, CheckpointShards, load_checkpoint,
                                     read_input_quantizers, read_qtensors, weight_file_names, weight_files)
from lowbit.model.shards import ShardWriter, shard_name
from lowbit.pipeline.resume import state_folder
from lowbit.workflow import CalibrationOptions, QuantizeOptions, quantize_job
from tests.arch_models import tiny_model
from tests.kill_points import Killed, die_after_block
from tests.conftest import make_tokenizer

TEXT = "calib.txt"
OUT_SHARD = 40_000  # output shards of at most 40 kB: the tiny models' outputs (~100 kB) take several
CALIB = ["--calib-samples", "4", "--calib-length", "32", "--calib-batch", "2", "--no-eval", "--json"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny llama and qwen2 saved as sharded folders (model-0000k-of-0000n + index), a calibration text beside."""
    from lowbit.data.text import default_text

    root = tmp_path_factory.mktemp("sharded")
    (root / TEXT).write_text(default_text()[:12_000])
    tokenizer = make_tokenizer(default_text())
    out = {}
    for family in ("llama", "qwen2"):
        folder = root / family
        tiny_model(family).save_pretrained(str(folder), max_shard_size="40KB")
        tokenizer.save_pretrained(str(folder))
        out[family] = folder
    return out


def _options(folder: Path, out: Path, method: str, stream: bool, **kw) -> QuantizeOptions:
    text = str(folder.parent / TEXT)
    return QuantizeOptions(model=str(folder), method=method, out=str(out), force=True, evaluate=False, stream=stream,
                           calibration=CalibrationOptions(text, samples=4, length=32, batch_size=2),
                           shard_bytes=OUT_SHARD, **kw)


def _assert_same_weights(a: Path, b: Path) -> None:
    qa, fa = read_qtensors(a / WEIGHTS_FILE)
    qb, fb = read_qtensors(b / WEIGHTS_FILE)
    assert qa.keys() == qb.keys() and fa.keys() == fb.keys()
    for name, qt in qa.items():
        other = qb[name]
        assert qt.spec == other.spec and qt.shape == other.shape, name
        for part in ("codes", "scales", "zeros", "global_scale"):
            x, y = getattr(qt, part), getattr(other, part)
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f"{name}.{part}"
    for name, t in fa.items():
        assert t.dtype == fb[name].dtype and torch.equal(t, fb[name]), name
    ia, ib = read_input_quantizers(a / WEIGHTS_FILE), read_input_quantizers(b / WEIGHTS_FILE)
    assert ia.keys() == ib.keys()
    for name, (spec, scale) in ia.items():
        assert spec == ib[name][0] and (scale is None) == (ib[name][1] is None)
        assert scale is None or torch.equal(scale, ib[name][1]), name


CASES = [("llama", m, {}) for m in ("rtn", "gptq", "awq", "smoothquant", "awq+gptq", "smoothquant+gptq")]
CASES += [("qwen2", m, {}) for m in ("rtn", "gptq", "awq+gptq", "smoothquant+gptq")]
CASES += [("llama", "smoothquant", {"scheme": "W8A8", "activations": "int8:tensor:static"})]


@pytest.mark.parametrize("family, method, extra", CASES, ids=[f"{f}-{m}{'-static' if e else ''}" for f, m, e in CASES])
def test_every_method_streamed_equals_in_memory(folders, tmp_path, family, method, extra):
    streamed = quantize_job(_options(folders[family], tmp_path / "s", method, True, **extra), progress=False)[1]
    in_memory = quantize_job(_options(folders[family], tmp_path / "m", method, False, **extra), progress=False)[1]
    files = weight_files(streamed / WEIGHTS_FILE)
    assert len(files) >= 2 and (streamed / INDEX_FILE).is_file() and not (streamed / WEIGHTS_FILE).exists()
    assert [f.name for f in files] == [shard_name(k, len(files)) for k in range(1, len(files) + 1)]
    assert (in_memory / WEIGHTS_FILE).is_file() and not (in_memory / INDEX_FILE).exists()  # unchanged: one file
    _assert_same_weights(streamed, in_memory)
    if extra:
        assert read_input_quantizers(streamed / WEIGHTS_FILE), "static activation scales were written"


def test_sharded_output_loads_back_and_reports(folders, tmp_path):
    streamed, _ = quantize_job(_options(folders["qwen2"], tmp_path / "s", "gptq", True), progress=False)
    in_memory, _ = quantize_job(_options(folders["qwen2"], tmp_path / "m", "gptq", False), progress=False)
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    a, _, _ = load_checkpoint(tmp_path / "s")
    b, _, _ = load_checkpoint(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    for key in ("quantized_tensors", "quantized_weights", "bits_per_weight"):
        assert streamed[key] == in_memory[key], key
    assert streamed["weight_files"] >= 2 and streamed["size_bytes"] > 0
    shards = {f.name for f in weight_files(tmp_path / "s" / WEIGHTS_FILE)}
    assert weight_file_names(tmp_path / "s") == {WEIGHTS_FILE, INDEX_FILE} | shards  # what exporters must not copy
    index = json.loads((tmp_path / "s" / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(streamed_tensor_bytes(tmp_path / "s").values())
    est = streamed["memory_estimate"]
    assert est["parts"]["one block in fp32"] == est["block_fp32_bytes"] > 0
    # an export of the sharded output writes its own weights and copies only the other files (tokenizer ...)
    assert main(["export", "gptq", str(tmp_path / "s"), "--out", str(tmp_path / "g"), "--json"]) == 0
    exported = {f.name for f in (tmp_path / "g").iterdir()}
    assert WEIGHTS_FILE in exported and not exported & (shards | {INDEX_FILE})
    assert "tokenizer.json" in exported


def streamed_tensor_bytes(out: Path) -> dict[str, int]:
    from safetensors import safe_open

    sizes = {}
    for file in weight_files(out / WEIGHTS_FILE):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                sizes[key] = t.numel() * t.element_size()
    return sizes


def test_finished_blocks_are_written_and_dropped(folders, tmp_path):
    """Each block goes to the writer as soon as it is done; the result keeps only what is outside the blocks,
    and the weights outside the blocks are not in memory while the blocks run."""
    from lowbit.model.streaming import StreamingSource
    from lowbit.pipeline.calibrated import quantize_calibrated
    from lowbit.workflow import build_recipe

    source = StreamingSource(folders["llama"])
    recipe = build_recipe(QuantizeOptions(method="gptq"))
    shards = CheckpointShards(tmp_path, max_shard_bytes=1)  # every block flushes the one before it
    seen = []

    def sink(qtensors, floats, quantizers):
        shards.add(qtensors, floats, quantizers)
        seen.append((sorted({n.split(".")[2] for n in qtensors}), source.materialized_blocks(),
                     source.model.model.embed_tokens.weight.is_meta, len(list(tmp_path.glob(".shard-*")))))

    ids = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    qm = quantize_calibrated(source.model, recipe, ids, batch_size=2, progress=False, source=source, sink=sink)
    assert seen == [(["0"], [0], True, 0), (["1"], [1], True, 1)]
    assert not any(n.startswith("model.layers.") for n in list(qm.qtensors) + list(qm.float_tensors))
    assert not source.model.model.embed_tokens.weight.is_meta  # loaded again for the end


def test_a_killed_streamed_run_resumes_to_the_same_shards(folders, tmp_path, monkeypatch):
    full = quantize_job(_options(folders["llama"], tmp_path / "full", "gptq", True), progress=False)[1]
    out = tmp_path / "out"
    die_after_block(monkeypatch)
    with pytest.raises(Killed):
        quantize_job(_options(folders["llama"], out, "gptq", True), progress=False)
    monkeypatch.undo()
    assert not out.exists() and state_folder(out).is_dir()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    quantize_job(_options(folders["llama"], out, "gptq", True, resume=True), progress=False)
    names = sorted(p.name for p in full.iterdir() if p.name != "report.json")
    assert names == sorted(p.name for p in out.iterdir() if p.name != "report.json")
    assert all((full / n).read_bytes() == (out / n).read_bytes() for n in names)


def test_shard_writer_never_splits_a_group_and_one_shard_is_model_safetensors(tmp_path):
    def meta(entries):
        return {"entries": json.dumps(sorted(entries))}

    group = {"a": torch.zeros(10), "b": torch.ones(5)}  # 60 bytes
    writer = ShardWriter(tmp_path / "one", 1000, meta)
    (tmp_path / "one").mkdir()
    writer.add(group, {"a": 1})
    assert [p.name for p in writer.finish()] == [WEIGHTS_FILE]
    (tmp_path / "many").mkdir()
    writer = ShardWriter(tmp_path / "many", 100, meta)
    for i in range(3):
        writer.add({f"{k}{i}": t for k, t in group.items()}, {f"g{i}": i})
    files = writer.finish()
    assert [f.name for f in files] == [shard_name(k, 3) for k in (1, 2, 3)]
    index = json.loads((tmp_path / "many" / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 180
    assert index["weight_map"] == {f"{k}{i}": shard_name(i + 1, 3) for i in range(3) for k in "ab"}


def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _broken_copy(folders, tmp_path: Path, change) -> Path:
    folder = Path(shutil.copytree(folders["qwen2"], tmp_path / "model"))
    change(folder)
    return folder


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_FILE).read_text())


def _drop_from_index(folder: Path) -> None:
    data = _index(folder)
    del data["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (folder / INDEX_FILE).write_text(json.dumps(data))


def _point_elsewhere(folder: Path) -> None:
    data = _index(folder)
    key = "model.layers.1.mlp.up_proj.weight"
    data["weight_map"][key] = next(f for f in sorted(set(data["weight_map"].values())) if f != data["weight_map"][key])
    (folder / INDEX_FILE).write_text(json.dumps(data))


def _missing_shard(folder: Path) -> None:
    (folder / _index(folder)["weight_map"]["model.layers.0.self_attn.q_proj.weight"]).unlink()


def _gap_without_index(folder: Path) -> None:
    _missing_shard(folder)
    (folder / INDEX_FILE).unlink()


BROKEN = {
    "missing shard": (_missing_shard, ("is missing", "named by " + INDEX_FILE)),
    "index not JSON": (lambda f: (f / INDEX_FILE).write_text("{not json"), ("not valid JSON", INDEX_FILE)),
    "tensor in no shard": (_drop_from_index, ("model.layers.1.mlp.up_proj.weight", "listed in no shard")),
    "tensor not in its shard": (_point_elsewhere, ("model.layers.1.mlp.up_proj.weight", "does not hold it")),
    "gap without index": (_gap_without_index, ("is missing", "no " + INDEX_FILE)),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_sharded_folder_is_a_one_line_error_before_any_work(folders, tmp_path, capsys, case):
    change, needles = BROKEN[case]
    folder = _broken_copy(folders, tmp_path, change)
    out = tmp_path / "out"
    assert main(["quantize", str(folder), "--out", str(out), "--stream", "--method", "gptq", *CALIB,
                 "--calib-text", str(folders["qwen2"].parent / TEXT)]) == 2
    _one_line_error(capsys, str(folder), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output, no temporary, no state


def test_a_sharded_output_missing_a_shard_is_a_one_line_error(folders, tmp_path):
    quantize_job(_options(folders["llama"], tmp_path / "s", "rtn", True), progress=False)
    first = weight_files(tmp_path / "s" / WEIGHTS_FILE)[0]
    first.unlink()
    with pytest.raises(LowbitError, match=f"shard {first.name} named by {INDEX_FILE} is missing"):
        load_checkpoint(tmp_path / "s")


def test_an_error_mid_run_leaves_nothing_half_written(folders, tmp_path, capsys):
    """Block 1's weights hold a NaN: block 0 was already written into the temporary folder, which goes."""
    from safetensors.torch import load_file, save_file

    def poison(folder: Path) -> None:
        key = "model.layers.1.mlp.down_proj.weight"
        file = folder / _index(folder)["weight_map"][key]
        tensors = load_file(str(file))
        tensors[key][0, 0] = float("nan")
        save_file(tensors, str(file), metadata={"format": "pt"})

    folder = _broken_copy(folders, tmp_path, poison)
    out = tmp_path / "out"
    assert main(["quantize", str(folder), "--out", str(out), "--stream", *CALIB,
                 "--calib-text", str(folders["qwen2"].parent / TEXT)]) == 2
    _one_line_error(capsys, "model.layers.1.mlp.down_proj.weight")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


@pytest.mark.parametrize("args, needles", [
    (["--stream", "--max-memory", "10KB"], ("below one block of this model in fp32",)),
    (["--stream", "--max-memory", "300MB"], ("exceeds --max-memory 300.0 MB", "raise --max-memory")),
    (["--max-memory", "300MB"], ("peak calibrating", "exceeds --max-memory 300.0 MB", "at least", "with --stream")),
    (["--stream", "--max-memory", "lots"], ("--max-memory 'lots' must be a size",)),
])
def test_max_memory_refuses_a_plan_that_does_not_fit(folders, tmp_path, capsys, args, needles):
    out = tmp_path / "out"
    assert main(["quantize", str(folders["llama"]), "--out", str(out), "--method", "gptq", *CALIB,
                 "--calib-text", str(folders["llama"].parent / TEXT), *args]) == 2
    _one_line_error(capsys, *needles)
    assert not out.exists() and not state_folder(out).exists()


def test_the_estimate_is_printed_and_a_plan_that_fits_runs(folders, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        assert main(["quantize", str(folders["llama"]), "--out", str(out), "--method", "gptq", "--stream", *CALIB,
                     "--calib-text", str(folders["llama"].parent / TEXT), "--max-memory", "4GB"]) == 0
    assert "lowbit: note: memory estimate" in caplog.text and "one block in fp32" in caplog.text
    assert json.loads((out / "report.json").read_text())["memory_estimate"]["bytes"] < 4 * 10**9


def _estimate(total_rest: int, acts: int, samples: int, block: int = 100):
    from lowbit.pipeline.memory_plan import MemoryEstimate

    return MemoryEstimate("in memory", (("model in fp32", total_rest), ("calibration activations", acts)), block,
                          acts, samples)


def test_check_fits_names_only_changes_that_would_fit():
    from lowbit.pipeline.memory_plan import check_fits

    check_fits(_estimate(500, 500, 10), 1000)  # fits exactly
    with pytest.raises(LowbitError, match="below one block"):
        check_fits(_estimate(10**7, 0, 0, block=10**6), 10**6 - 1)
    with pytest.raises(LowbitError, match=r"pass --stream \(estimate .*\) or pass --calib-samples 5 or fewer$"):
        check_fits(_estimate(2 * 10**6, 10**6, 10), 25 * 10**5, streamed_estimate=_estimate(2 * 10**6, 0, 10))
    with pytest.raises(LowbitError, match="raise --max-memory to at least 2.5 MB with --stream$"):
        check_fits(_estimate(4 * 10**6, 0, 10), 2 * 10**6, streamed_estimate=_estimate(25 * 10**5, 0, 10))


def test_the_estimate_follows_the_formula(folders):
    """Streamed: one block in fp32 + the activations entering and leaving it (n x length x hidden x 4 each) + ..."""
    from lowbit.model.streaming import StreamingSource
    from lowbit.pipeline.memory_plan import RUNTIME_BYTES
    from lowbit.workflow import build_recipe
    from lowbit.workflow_stream import streamed_estimate

    source = StreamingSource(folders["llama"])
    opts = _options(folders["llama"], Path("unused"), "gptq", True)
    estimate = streamed_estimate(source.model, build_recipe(opts), opts)
    parts = dict(estimate.parts)
    assert estimate.phase == "in the blocks"
    assert parts["one block in fp32"] == 4 * sum(p.numel() for p in source.blocks[0].parameters())
    assert parts["calibration activations"] == 2 * 4 * 32 * 64 * 4 == estimate.activation_bytes
    assert parts["runtime"] == RUNTIME_BYTES and parts["statistics"] > 0
    assert estimate.total == sum(parts.values())
