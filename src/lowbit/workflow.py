"""The jobs behind the CLI: quantize a model and measure it, or re-evaluate a written checkpoint.

Both measure against the unquantized model on the same tokens. The original's outputs are computed
first and kept, so only one copy of the model's weights is ever in memory.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit import __version__
from lowbit.data.text import calibration_windows, eval_windows, load_text, paragraphs, text_label, tokenize
from lowbit.errors import LowbitError
from lowbit.hardware import cpu_has_bf16  # noqa: F401  (re-exported: bench scripts import it from here)
from lowbit.formats.activation import parse_activation_spec
from lowbit.eval.encoder import compare_embeddings, embed
from lowbit.eval.lm import compare_lm, lm_reference
from lowbit.eval.size import quantized_bits_per_weight
from lowbit.io_utils import atomic_directory
from lowbit.model.apply import QuantizedModel, quantize_model
from lowbit.model.finite import check_forward, check_parameters, check_quantized, probe_inputs
from lowbit.model.checkpoint import (DEFAULT_SHARD_BYTES, WEIGHTS_FILE, load_checkpoint, read_manifest, weights_bytes,
                                     write_checkpoint)
from lowbit.methods import default_scale_search, needs_calibration
from lowbit.model.load import CAUSAL_LM, LoadedModel, load_model, resolve_source
from lowbit.pipeline.calibrated import peak_rss_mb, quantize_calibrated
from lowbit.pipeline.resume import BlockState, make_fingerprint, source_identity, state_folder
from lowbit.recipe import DEFAULT_IGNORE, Recipe, Rule, load_recipe, parse_rule, save_recipe
from lowbit.schemes import get_scheme, weight_spec
from lowbit.workflow_report import checkpoint_manifest, checkpoint_report, heads_report, plan_heads, write_report

DEFAULT_SCHEME = "W4A16"
log = logging.getLogger("lowbit")


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate on: a text file (None: pydoc topics), LM windows, or encoder sentences."""

    text: str | None = None
    windows: int = 8
    length: int = 512
    sentences: int = 256
    reference_store: str = "fp32"  # the original's log-probabilities on disk: fp32 (exact) or fp16 (lowbit.eval.lm)


@dataclass(frozen=True)
class CalibrationOptions:
    """Calibration samples for calibrated methods: n windows of ``length`` tokens, after the eval windows."""

    text: str | None = None
    samples: int = 128
    length: int = 512
    batch_size: int = 8
    seed: int = 0
    dtype: str = "auto"


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything ``lowbit quantize`` takes."""

    model: str | None = None
    scheme: str = DEFAULT_SCHEME
    method: str = "rtn"
    group_size: int | None = None
    symmetric: bool | None = None
    scale_search: str | None = None
    dtype: str | None = None
    rules: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    recipe_file: str | None = None
    out: str | None = None
    force: bool = False
    evaluate: bool = True
    eval: EvalOptions = field(default_factory=EvalOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    method_options: tuple[tuple[str, object], ...] = ()
    activations: str | None = None
    stream: bool = False
    embeddings: str | None = None  # int8 | int4 | keep | a spec; None: default (lowbit.model.embeddings)
    lm_head: str | None = None
    target_bpw: float | None = None  # budgeted mixed precision (lowbit.analysis): average bits per weight ...
    target_size: str | None = None  # ... or total size ("90MB")
    candidates: tuple[str, ...] = ()  # the precisions the allocation chooses from (empty: the defaults)
    formats: tuple[str, ...] = ("lowbit",)  # every format that will be written (candidates must fit all)
    preset: str | None = None  # a named layer strategy (lowbit.presets)
    resume: bool = False  # continue a killed calibrated run from <out>.calib-state (lowbit.pipeline.resume)
    max_memory: str | None = None  # refuse a run whose memory estimate exceeds this ("4GB"; lowbit.workflow_stream)
    shard_bytes: int = DEFAULT_SHARD_BYTES  # --stream writes its output in shards of at most this many bytes


@dataclass(frozen=True)
class Calibration:
    """A calibrated run's samples (n x length token ids), the report's calibration section, and the per-block
    state it saves (None: not resumable, e.g. inside QAT)."""

    ids: torch.Tensor
    report: dict[str, Any]
    state: BlockState | None = None


def build_recipe(opts: QuantizeOptions) -> Recipe:
    """The recipe for these options: a recipe file or preset if given, else the scheme plus CLI rules and ignores."""
    if opts.recipe_file and opts.preset:
        raise LowbitError("give either --recipe or --preset, not both")
    if opts.preset or opts.recipe_file:
        from lowbit.presets import preset_recipe

        recipe = preset_recipe(opts.preset) if opts.preset else load_recipe(opts.recipe_file)
        extra = tuple(parse_rule(r) for r in opts.rules)
        return Recipe(recipe.scheme, opts.method if opts.method != "rtn" else recipe.method,
                      opts.dtype or recipe.float_dtype, extra + recipe.rules, recipe.ignore + opts.ignore,
                      {**recipe.options, **dict(opts.method_options)})
    scheme = get_scheme(opts.scheme)
    spec = weight_spec(scheme, opts.group_size, opts.symmetric, opts.scale_search)
    search = default_scale_search(opts.method)
    if opts.scale_search is None and search and spec is not None and spec.format.startswith("int"):
        spec = spec.with_options(scale_search=search)  # the method's measured-best default for integer grids
    rules = tuple(parse_rule(r) for r in opts.rules)
    act = opts.activations or scheme.activations
    if spec is not None:
        rules += (Rule(targets=("Linear",), spec=spec, input_spec=parse_activation_spec(act) if act else None),)
    return Recipe(scheme=scheme.name, method=opts.method, float_dtype=opts.dtype or scheme.float_dtype,
                  rules=rules, ignore=DEFAULT_IGNORE + opts.ignore, options=dict(opts.method_options))


def recipe_needs_calibration(recipe: Recipe) -> bool:
    """Whether the recipe's method or its static activation scales need calibration data."""
    static_acts = any(r.input_spec is not None and not r.input_spec.dynamic for r in recipe.rules)
    return needs_calibration(recipe.method) or static_acts


def default_out_dir(opts: QuantizeOptions, recipe: Recipe) -> Path:
    """out/<model>-<scheme>[-g<N>][-asym][-mse]: a readable default output folder name."""
    model = Path(opts.model).stem if opts.model else "smollm2"
    parts = [model.lower(), recipe.scheme.lower()]
    if opts.group_size:
        parts.append(f"g{opts.group_size}")
    if opts.symmetric is False:
        parts.append("asym")
    if opts.scale_search == "mse":
        parts.append("mse")
    if opts.method != "rtn":
        parts.append(opts.method)
    if opts.target_bpw is not None:
        parts.append(f"bpw{opts.target_bpw:g}")
    if opts.target_size is not None:
        parts.append(f"size{opts.target_size}")
    return Path("out") / re.sub(r"[^a-z0-9_.-]+", "-", "-".join(parts))


class Evaluator:
    """Keeps the original model's outputs on the evaluation data and compares other models with them."""

    def __init__(self, loaded_kind: str, tokenizer: Any, opts: EvalOptions, progress: bool = True):
        self.kind, self.tokenizer, self.opts, self.progress = loaded_kind, tokenizer, opts, progress
        self.text = load_text(opts.text)
        self.reference: Any = None

    def observe_original(self, model: torch.nn.Module) -> None:
        """Run the original model over the evaluation data and keep its outputs."""
        if self.kind == CAUSAL_LM:
            windows = eval_windows(tokenize(self.tokenizer, self.text), self.opts.windows, self.opts.length)
            self.reference = lm_reference(model, windows.ids, self.progress, self.opts.reference_store)
        else:
            self.sentences = paragraphs(self.text, self.opts.sentences)
            self.reference = embed(model, self.tokenizer, self.sentences, progress=self.progress)

    def compare(self, model: torch.nn.Module) -> dict[str, Any]:
        """The eval section of report.json for ``model`` against the original."""
        head: dict[str, Any] = {"text": text_label(self.opts.text)}
        if self.kind == CAUSAL_LM:
            ref = self.reference
            head.update(windows=int(ref.windows.shape[0]), window_length=int(ref.windows.shape[1]),
                        tokens=int(ref.windows.numel()))
            return head | compare_lm(model, ref, self.progress)
        emb = embed(model, self.tokenizer, self.sentences, progress=self.progress)
        return head | {"sentences": len(self.sentences)} | compare_embeddings(self.reference, emb)


def quantize_job(opts: QuantizeOptions, progress: bool = True) -> tuple[dict[str, Any], Path]:
    """Load, quantize, write atomically, measure; returns (report, output folder)."""
    t0 = time.perf_counter()
    recipe = build_recipe(opts)
    out_dir = Path(opts.out) if opts.out else default_out_dir(opts, recipe)
    _refuse_existing(out_dir, opts.force)
    if opts.stream:
        from lowbit.workflow_stream import stream_job

        return stream_job(opts, recipe, out_dir, progress)
    from lowbit.workflow_stream import estimate_report, in_memory_estimate

    estimate = in_memory_estimate(opts, recipe)  # a folder: printed, and refused beyond --max-memory, before loading
    loaded = load_model(opts.model)
    estimate = estimate or in_memory_estimate(opts, recipe, loaded.model)  # a GGUF file: once loaded
    check_parameters(loaded.model)  # NaN/Inf weights: say which before evaluating or calibrating anything
    recipe = resolve_aliases(recipe, loaded.model)
    budgeted = _plan_budget(opts, recipe, loaded, progress)
    heads = budgeted.heads if budgeted else plan_heads(opts, recipe, loaded.model)
    recipe = heads.recipe
    calib = prepare_calibration(loaded, recipe, opts, out_dir)  # a changed --resume state is refused before any work
    t_load = time.perf_counter() - t0
    evaluator = Evaluator(loaded.kind, loaded.tokenizer, opts.eval, progress) if opts.evaluate else None
    t1 = time.perf_counter()
    if evaluator:
        evaluator.observe_original(loaded.model)
    t_ref = time.perf_counter() - t1
    qm, calibration = post_training(loaded, recipe, opts, progress, calib)
    if not qm.qtensors and recipe.rules and any(r.spec for r in recipe.rules):
        raise LowbitError("the recipe's rules matched no weight of this model; check the targets")
    check_quantized(qm, probe_inputs(loaded.kind, loaded.tokenizer,
                                     evaluator.text if evaluator else load_text(opts.eval.text)))
    if calibration is not None:
        calibration["fp32_blocks"] = qm.fp32_blocks
    with atomic_directory(out_dir, force=opts.force) as tmp:
        write_checkpoint(qm, tmp, loaded.model.config, loaded.tokenizer, checkpoint_manifest(loaded, recipe))
        save_recipe(recipe, tmp / "recipe.yaml")
        report = checkpoint_report(loaded, qm, tmp, None, {"load": t_load, "quantize": qm.seconds})
        report["calibration"] = calibration
        report.update(heads_report(heads, qm, loaded.model, report["size_bytes"]))
        qm.qtensors.clear()  # written; the evaluation needs only the fake-quant model (frees the codes' memory)
        t2 = time.perf_counter()
        report["eval"] = evaluator.compare(qm.model) if evaluator else None
        if budgeted:
            report["allocation"] = {**recipe.options["allocation"],
                                    "measured_kld": report["eval"]["kld"] if report["eval"] else None,
                                    "sensitivity_seconds": budgeted.sensitivity.seconds.get("total"),
                                    "sensitivity_cached": budgeted.sensitivity.cached}
        report["seconds"]["eval"] = t_ref + time.perf_counter() - t2
        report["peak_rss_mb"] = peak_rss_mb()
        report["memory_estimate"] = estimate_report(estimate) if estimate else None
        write_report(report, tmp / "report.json")
    _written(calib)
    return report, out_dir


def post_training(loaded: LoadedModel, recipe: Recipe, opts: QuantizeOptions, progress: bool = True,
                  calib: Calibration | None = None) -> tuple[QuantizedModel, dict[str, Any] | None]:
    """Quantize ``loaded.model`` in place by ``recipe``: block by block with calibration samples when a method
    needs them (GPTQ, AWQ, SmoothQuant, static activations), else tensor by tensor. Returns the result and the
    calibration section of the report (None when uncalibrated). ``calib``: samples and resumable state made
    by ``prepare_calibration`` (None: drawn here, nothing saved per block)."""
    if recipe_needs_calibration(recipe):
        if calib is None:
            calib = Calibration(*_calibration_samples(loaded, opts))
        qm = quantize_calibrated(loaded.model, recipe, calib.ids, opts.calibration.batch_size, progress,
                                 compute_dtype=_compute_dtype(opts), state=calib.state)
        return qm, calib.report
    return quantize_model(loaded.model, recipe, progress), None


def prepare_calibration(loaded: LoadedModel, recipe: Recipe, opts: QuantizeOptions,
                        out_dir: Path) -> Calibration | None:
    """``calibration_with_state(...)`` when the recipe needs calibration, else None (and a note if --resume was
    given)."""
    if recipe_needs_calibration(recipe):
        return calibration_with_state(loaded, recipe, opts, out_dir)
    if opts.resume:
        log.warning("lowbit: note: --resume: method %s is not calibrated block by block; nothing to resume",
                    recipe.method)
    return None


def calibration_with_state(loaded: LoadedModel, recipe: Recipe, opts: QuantizeOptions,
                           out_dir: Path) -> Calibration:
    """The calibration samples and the per-block state in ``<out_dir>.calib-state``: the one to continue with
    ``opts.resume`` (refused if made for another model, data or recipe), else a fresh one that replaces any
    an earlier run left."""
    ids, report = _calibration_samples(loaded, opts)
    fingerprint = make_fingerprint(source_identity(resolve_source(opts.model)), recipe, ids,
                                   opts.calibration.batch_size, _compute_dtype(opts), opts.stream)
    return Calibration(ids, report, BlockState.open(state_folder(out_dir), fingerprint, opts.resume))


def _written(calib: Calibration | None) -> None:
    """The output is written: the calibration state it was resumable from goes (a finished run leaves nothing)."""
    if calib is not None and calib.state is not None:
        calib.state.remove()


def _refuse_existing(out_dir: Path, force: bool) -> None:
    """Refuse an existing output before any work rather than after it (``atomic_directory`` checks again)."""
    if out_dir.exists() and not force and (out_dir.is_file() or any(out_dir.iterdir())):
        raise LowbitError(f"output {out_dir} already exists; choose another --out or pass --force to replace it")


def _plan_budget(opts: QuantizeOptions, recipe: Recipe, loaded: LoadedModel, progress: bool):
    """The budgeted plan (lowbit.analysis.planning) when --target-bpw/--target-size is given, else None."""
    if opts.target_bpw is None and opts.target_size is None:
        return None
    from lowbit.analysis.budget import Budget, parse_size
    from lowbit.analysis.planning import plan_budget
    from lowbit.analysis.sensitivity import AnalyzeOptions

    if opts.recipe_file or opts.preset:
        raise LowbitError("--target-bpw/--target-size choose the recipe themselves; drop --recipe/--preset")
    if opts.stream:
        raise LowbitError("--target-bpw/--target-size need the whole model for the sensitivity analysis; drop --stream")
    budget = Budget(opts.target_bpw, parse_size(opts.target_size) if opts.target_size else None)
    same_text = opts.calibration.text == opts.eval.text
    analysis = AnalyzeOptions(
        model=opts.model, candidates=opts.candidates, formats=opts.formats, group_size=opts.group_size,
        symmetric=opts.symmetric, float_dtype=recipe.float_dtype, calib_text=opts.calibration.text,
        eval_tokens=opts.eval.windows * opts.eval.length if same_text else 0, seed=opts.calibration.seed,
        compute_dtype=opts.calibration.dtype)
    act = opts.activations or get_scheme(opts.scheme).activations
    return plan_budget(loaded, recipe, budget, analysis, tuple(parse_rule(r) for r in opts.rules), opts.ignore,
                       opts.embeddings, opts.lm_head, parse_activation_spec(act) if act else None, progress)


def resolve_aliases(recipe: Recipe, model: torch.nn.Module) -> Recipe:
    """Recipe targets ``@embeddings`` / ``@head`` (used by presets) replaced by this model's module names."""
    from lowbit.presets import resolve_targets

    return resolve_targets(recipe, model)


def _compute_dtype(opts: QuantizeOptions) -> torch.dtype:
    """bf16 calibration passes when asked, or by default where the CPU runs bf16 natively (same quality, ~3x faster)."""
    if opts.calibration.dtype == "auto":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.bfloat16 if opts.calibration.dtype == "bf16" else torch.float32


def _calibration_samples(loaded: LoadedModel, opts: QuantizeOptions) -> tuple[torch.Tensor, dict[str, Any]]:
    """Calibration windows from the part of the text the evaluation does not use, and how they were drawn."""
    cal = opts.calibration
    ids = tokenize(loaded.tokenizer, load_text(cal.text))
    same_text = cal.text == opts.eval.text
    skip = opts.eval.windows * opts.eval.length if same_text else 0
    windows = calibration_windows(ids, cal.samples, cal.length, eval_tokens=skip, seed=cal.seed)
    if windows.ids.shape[0] < cal.samples:
        raise LowbitError(f"the calibration text gives only {windows.ids.shape[0]} samples of {cal.length} tokens, "
                          f"{cal.samples} were asked for; pass --calib-samples or a longer --calib-text")
    starts = [int(skip + i * cal.length) for i in windows.picks.tolist()]
    return windows.ids, {"text": text_label(cal.text), "samples": int(windows.ids.shape[0]), "length": cal.length,
                         "dtype": "bf16" if _compute_dtype(opts) == torch.bfloat16 else "fp32",
                         "first_token": skip, "seed": cal.seed, "sample_starts": starts}


def eval_job(out_dir: str | Path, opts: EvalOptions, progress: bool = True) -> dict[str, Any]:
    """Re-evaluate a written checkpoint against the original it was made from."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise LowbitError(f"{out_dir} is not a folder; give a lowbit quantize output folder")
    manifest = read_manifest(out_dir)
    original = load_model(manifest["source"])
    evaluator = Evaluator(original.kind, original.tokenizer, opts, progress)
    t0 = time.perf_counter()
    evaluator.observe_original(original.model)
    del original
    model, _, _ = load_checkpoint(out_dir)
    check_forward(model, probe_inputs(evaluator.kind, evaluator.tokenizer, evaluator.text), f"the checkpoint {out_dir}",
                  written=False)
    metrics = evaluator.compare(model)
    bpw = quantized_bits_per_weight(out_dir / WEIGHTS_FILE)
    return {
        "model": manifest["source"], "checkpoint": str(out_dir), "scheme": manifest.get("scheme"),
        "method": manifest.get("method"), "spec": manifest.get("spec"),
        "size_bytes": weights_bytes(out_dir / WEIGHTS_FILE), "bits_per_weight": bpw,
        "eval": metrics, "seconds": {"eval": time.perf_counter() - t0}, "lowbit_version": __version__,
    }
