"""Tiny random models of every family in lowbit's architecture table, built from transformers config classes
(nothing is downloaded). Hidden size 64, two blocks, grouped-query attention where the family has it.

Weights are scaled up from the 0.02 initialization and norms/biases perturbed, so that norm conventions
(Gemma's 1 + weight) and quantization visibly matter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.arch import family_of
from lowbit.formats import parse_spec
from lowbit.model.apply import quantize_model
from lowbit.model.conv1d import linearize_conv1d
from lowbit.pipeline.calibrated import quantize_calibrated
from lowbit.pipeline.layers import capture_inputs, find_blocks, run_block
from lowbit.pipeline.observe import observe_block
from lowbit.recipe import Recipe, Rule
from lowbit.transforms.awq import search_scales
from lowbit.transforms.mappings import applicable_mappings, fold_scales
from lowbit.transforms.smoothquant import smoothing_scales
from tests.conftest import TINY_VOCAB, make_tokenizer

METHODS = ("rtn", "gptq", "awq", "awq+gptq", "smoothquant+rtn")

_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
_BERT = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=300)

# family name -> (config class name in transformers, config kwargs, encoder?)
CONFIGS: dict[str, tuple[str, dict, bool]] = {
    "llama": ("LlamaConfig", _COMMON, False),
    "mistral": ("MistralConfig", _COMMON, False),
    "qwen2": ("Qwen2Config", _COMMON, False),
    "qwen3": ("Qwen3Config", _COMMON | dict(head_dim=16), False),
    "gemma2": ("Gemma2Config", _COMMON | dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64), False),
    "gemma3": ("Gemma3TextConfig", _COMMON | dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64), False),
    "phi3": ("Phi3Config", _COMMON | dict(pad_token_id=0, bos_token_id=1, eos_token_id=2), False),
    "gpt2": ("GPT2Config", dict(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256), False),
    "bert": ("BertConfig", _BERT, True),
    "xlm-roberta": ("XLMRobertaConfig", _BERT | dict(pad_token_id=1), True),
}
DECODERS = tuple(name for name, (_, _, enc) in CONFIGS.items() if not enc)
ENCODERS = tuple(name for name, (_, _, enc) in CONFIGS.items() if enc)


def tiny_config(family: str, **overrides):
    import transformers

    class_name, kwargs, _ = CONFIGS[family]
    return getattr(transformers, class_name)(**(kwargs | overrides))


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 tiny model of ``family`` in eval mode (causal LM for decoders, base model for encoders)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    encoder = CONFIGS[family][2]
    config = tiny_config(family, **overrides)
    model = (AutoModel if encoder else AutoModelForCausalLM).from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(4)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer) of a tiny ``family`` model."""
    from lowbit.data.text import default_text

    tiny_model(family, seed, **overrides).save_pretrained(str(path), safe_serialization=True)
    make_tokenizer(default_text()).save_pretrained(str(path))
    return path


def lowbit_model(family: str) -> torch.nn.Module:
    """A tiny ``family`` model as lowbit sees it after loading (Conv1D projections made linear)."""
    model = tiny_model(family)
    linearize_conv1d(model)
    return model


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden states of an encoder."""
    with torch.no_grad():
        if family_of(model).encoder:
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return model(input_ids=ids).logits


def random_ids(n: int = 4, length: int = 32) -> torch.Tensor:
    """Reproducible token windows (ids >= 3, clear of the special tokens)."""
    return torch.randint(3, 512, (n, length), generator=torch.Generator().manual_seed(0))


def fold_everything(model, pairs, norm_offset, kind: str) -> int:
    """Fold a non-trivial scale into every applicable pair of every block; returns how many folds."""
    ids = random_ids()
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks[0], ids, batch_size=2)
    spec = parse_spec("int4:g32:asym")
    folds = 0
    for block in blocks:
        targets = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        stats, _ = observe_block(block, targets, inputs)
        for mapping, producer, consumers in applicable_mappings(block, pairs):
            st = stats[mapping.consumers[0]]
            weights = [c.weight.data for c in consumers]
            if kind == "awq":
                scales, _ = search_scales(weights, st.mean_abs(), st.hessian(), spec, grid=4)
            else:
                scales = smoothing_scales(st.abs_max, weights)
            scales = scales * torch.linspace(0.5, 2.0, scales.numel())  # make sure a real fold happens
            with torch.no_grad():
                fold_scales(producer, consumers, scales, norm_offset)
            folds += 1
        inputs = run_block(block, inputs)
    return folds


def output_error(reference: torch.Tensor, out: torch.Tensor, encoder: bool) -> float:
    """Mean KL(reference || quantized) of next-token distributions, or relative MSE of encoder states."""
    if encoder:
        return float(((out - reference) ** 2).mean() / (reference ** 2).mean())
    ref, q = reference.log_softmax(-1), out.log_softmax(-1)
    return float((ref.exp() * (ref - q)).sum(-1).mean())


def quantized_errors(family: str, spec: str = "int3:g32:asym") -> dict[str, float]:
    """Each method's output error against the float model of ``family`` on held-out token windows."""
    encoder = family in ENCODERS
    # 32 x 64 tokens: with 8 x 64, GPTQ's margin over RTN on a random model was within the calibration noise
    calib = torch.randint(3, 512, (32, 64), generator=torch.Generator().manual_seed(1))
    held_out = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(2))
    reference = outputs(lowbit_model(family), held_out)
    errors = {}
    for method in METHODS:
        model = lowbit_model(family)
        recipe = Recipe(scheme="W4A16", method=method, rules=(Rule(("Linear",), parse_spec(spec)),))
        if method == "rtn":
            quantize_model(model, recipe, progress=False)
        else:
            quantize_calibrated(model, recipe, calib, batch_size=4, progress=False)
        out = outputs(model, held_out)
        if not torch.isfinite(out).all():
            raise AssertionError(f"{family} {method}: non-finite outputs")
        errors[method] = output_error(reference, out, encoder)
    return errors
