"""``lowbit generate`` and ``lowbit ab page`` end to end on tiny Llamas: W8A16 stays closer to the original
than W2A16, a compressed-tensors folder generates what its lowbit folder does, a GGUF runs in llama.cpp, and bad
input is one line on stderr with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowbit.cli import main
from tests.arch_models import save_tiny
from tests.export.helpers import quantize_folder

PROMPTS = ["Lists are mutable sequences, typically used to store", "The \"with\" statement is used to wrap",
           "Strings implement all of the common sequence operations", "A class definition defines a class object"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama, its W8A16 and W2A16 (groups of 32) lowbit folders, and a prompts file."""
    root = tmp_path_factory.mktemp("cli-gen")
    source = save_tiny("llama", root / "hf", seed=5)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"source": source, "prompts": prompts,
            "w8": quantize_folder(source, root / "w8", ["--scheme", "W8A16"]),
            "w2": quantize_folder(source, root / "w2", ["--scheme", "W2A16", "--group-size", "32"])}


def generate(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["generate", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_w8a16_stays_closer_to_the_original_than_w2(tiny, capsys):
    w8 = generate(capsys, tiny["w8"], "--prompts", tiny["prompts"], "--new-tokens", "16")
    w2 = generate(capsys, tiny["w2"], "--prompts", tiny["prompts"], "--new-tokens", "16")
    assert w8["original"] == str(tiny["source"]) and w8["kind"] == "lowbit" and w8["engine"] == "transformers"
    assert w8["prompts"] == {"source": str(tiny["prompts"]), "count": 4, "new_tokens": 16}
    m8, m2 = w8["metrics"], w2["metrics"]
    for name in ("bleu", "chrf", "rouge_l", "tokens_to_divergence"):
        assert m8[name] > m2[name], name
    assert m8["tokens_to_divergence"] >= 8 and m2["exact_match"] == 0.0
    # both runs continued the same prompts from the same original
    assert [i["original"]["ids"] for i in w8["items"]] == [i["original"]["ids"] for i in w2["items"]]
    for item in w2["items"]:
        k = item["divergence"]
        assert item["original"]["ids"][:k] == item["quantized"]["ids"][:k]
        assert item["original"]["ids"][k:k + 1] != item["quantized"]["ids"][k:k + 1]
    # the default result file is the printed JSON
    assert json.loads((tiny["w8"] / "generation.json").read_text()) == w8


def test_table_output_and_ab_page_from_the_result(tiny, tmp_path, capsys):
    out = tmp_path / "gen.json"
    capsys.readouterr()
    assert main(["generate", str(tiny["w2"]), "--prompts", str(tiny["prompts"]), "--n-prompts", "2",
                 "--new-tokens", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "BLEU" in printed and "1st diff" in printed and f"wrote {out}" in printed
    assert json.loads(out.read_text())["prompts"]["count"] == 2
    assert main(["ab", "page", str(out)]) == 0
    page = (tmp_path / "ab.html").read_text()
    assert page.count('<section class="item"') == 2 and (tmp_path / "ab.key.json").is_file()
    assert main(["ab", "page", str(out)]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["ab", "page", str(out), "--force", "--labelled"]) == 0


def test_compressed_tensors_folder_generates_what_its_lowbit_folder_does(tiny, tmp_path, capsys):
    ckpt = quantize_folder(tiny["source"], tmp_path / "w4", ["--scheme", "W4A16", "--group-size", "32"])
    capsys.readouterr()
    assert main(["export", "hf", str(ckpt), "--out", str(tmp_path / "ct"), "--json"]) == 0
    args = ("--prompts", tiny["prompts"], "--new-tokens", "12")
    ours = generate(capsys, ckpt, *args)
    ct = generate(capsys, tmp_path / "ct", *args)
    assert ct["kind"] == "hf" and ct["original"] == str(tiny["source"])  # found through lowbit_export.json
    assert [i["quantized"]["ids"] for i in ct["items"]] == [i["quantized"]["ids"] for i in ours["items"]]


def test_gguf_runs_in_llama_cpp(tiny, tmp_path, capsys):
    gguf = tmp_path / "tiny-Q8_0.gguf"
    capsys.readouterr()
    assert main(["export", "gguf", str(tiny["source"]), "--type", "Q8_0", "--method", "rtn", "--out", str(gguf),
                 "--json"]) == 0
    result = generate(capsys, gguf, "--original", tiny["source"], "--prompts", tiny["prompts"], "--new-tokens", "12")
    assert result["engine"] == "llama.cpp" and result["original_engine"] == "transformers"
    assert result["metrics"]["tokens_to_divergence"] >= 4  # Q8_0: close to the float original
    assert (tmp_path / "tiny-Q8_0.generation.json").is_file()


@pytest.mark.parametrize("case", ["empty prompts", "long prompt", "no tokenizer", "not a model", "moved folder"])
def test_bad_input_is_one_line(tiny, tmp_path, capsys, case):
    import gguf

    args = [str(tiny["w8"])]
    if case == "empty prompts":
        (tmp_path / "p.jsonl").write_text("\n{\"prompt\": \"  \"}\n")
        args += ["--prompts", str(tmp_path / "p.jsonl")]
        expected = "p.jsonl has no usable line"
    elif case == "long prompt":
        (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"text": "word " * 300}))
        args += ["--prompts", str(tmp_path / "p.jsonl")]
        expected = "prompt p.jsonl:2 has"
    elif case == "no tokenizer":
        path = tmp_path / "bare.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_tensor("token_embd.weight", __import__("numpy").zeros((8, 4), dtype="float32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        args = [str(path)]
        expected = "bare.gguf has no tokenizer"
    elif case == "moved folder":  # a folder copied from another machine names an original that is not here
        import shutil

        shutil.copytree(tiny["w8"], tmp_path / "w8")
        manifest = json.loads((tmp_path / "w8" / "lowbit.json").read_text())
        (tmp_path / "w8" / "lowbit.json").write_text(json.dumps({**manifest, "source": "/elsewhere/tiny"}))
        args = [str(tmp_path / "w8")]
        expected = "was made from /elsewhere/tiny, which is not on this machine; pass --original"
    else:
        (tmp_path / "model.bin").write_bytes(b"\0" * 16)
        args = [str(tmp_path / "model.bin")]
        expected = "model.bin is neither a .gguf nor an .onnx file"
    capsys.readouterr()
    assert main(["generate", *args, "--new-tokens", "8"]) == 2
    err = capsys.readouterr().err
    if case == "long prompt":  # the original's tokenizer is needed: transformers' loading bar comes first
        err = err.rsplit("\r", 1)[-1].split("\n", 1)[-1] if "\r" in err else err
    assert err.count("\n") == 1 and err.startswith("lowbit: error: ") and expected in err, err
