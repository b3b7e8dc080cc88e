"""Write an encoder as an ONNX graph that onnxruntime runs: float, explicit QDQ, or integer (int8) kernels.

The job: quantize the float model with a lowbit recipe (its fake-quant twin is what we evaluate), trace
that twin to ONNX with mean pooling inside the graph (``onnx_trace``), find each quantized module's nodes
(``onnx_sites``), rewrite them (``onnx_qdq`` / ``onnx_int8``), write the residual Adds before each
LayerNormalization as Sum (``onnx_lower.residual_sums``: same sums, but onnxruntime keeps its fast
LayerNormalization instead of fusing its slow SkipLayerNormalization), store inferred shapes, check the
model with onnx.checker, and write it atomically. Modes:

- ``float``: the traced float graph, nothing quantized.
- ``qdq``: QuantizeLinear/DequantizeLinear pairs around float MatMuls (any integer spec, groups included).
- ``int8``: integer kernels (MatMulInteger / MatMulIntegerToFloat) for W8A8 linears, QDQ for the rest.

The int8 defaults are the measured best for onnxruntime (bench/onnx_minilm.py, on AVX2 and AVX-512 VNNI CPUs):
weights on a 7-bit grid stored as int8 (exact in the fast uint8 x int8 kernel of AVX2 CPUs, see ``onnx_int8``),
GPTQ rounding, asymmetric per-tensor int8 activations (one DynamicQuantizeLinear, which onnxruntime fuses into
its product) with SmoothQuant's per-channel input scaling where it at least halves a linear's per-tensor
loss, then symmetric per-token scales for the three linears still most hurt by a per-tensor scale (both
measured on calibration paragraphs that follow the evaluation ones), int8 embedding rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.model.load import CAUSAL_LM, ENCODER, LoadedModel, load_model

MODES = ("float", "qdq", "int8")
METHODS = ("rtn", "gptq")
DEFAULT_SCHEME = "W8A8"
EMBEDDING_SPEC = "int8:channel"
INT8_WEIGHTS = "int7:channel"
TENSOR_ACT = "int8:tensor:dynamic:asym"
TOKEN_ACT = "int8:token:dynamic"
EVAL_PARAGRAPHS = 256


@dataclass(frozen=True)
class OnnxExportOptions:
    """What ``lowbit export onnx`` takes: model, output, mode, and the quantization recipe.

    ``weights``/``activations`` override the scheme's specs (None: the mode's defaults: for int8
    ``int7:channel`` and per-tensor int8); ``token_linears`` linears (the most sensitive, measured) get
    per-token activation scales; ``smooth``: the linears that read their input alone get SmoothQuant's
    per-channel input scaling (an explicit Mul in the graph) where it at least halves their measured
    per-tensor loss (``onnx_sensitivity``; ``smooth_alpha`` its migration strength); ``act_rules`` (``PATTERN=ACTSPEC``) set input specs by name; ``keep``
    patterns stay in float. Calibration (GPTQ, sensitivity) uses the default text's paragraphs after the
    first ``EVAL_PARAGRAPHS`` (the evaluation sentences), or ``calib_text``. ``fuse``: integer linears that
    read the same input (q, k, v) run as one product and a Split (the same numbers; slower for batches, see
    ``onnx_int8``). ``residual_sums``: the residual Adds before LayerNormalization are written as Sum (the
    same sums), which keeps onnxruntime from fusing them into its slower SkipLayerNormalization (``onnx_lower``).
    """

    model: str | None = None
    out: str | None = None
    mode: str = "int8"
    scheme: str = DEFAULT_SCHEME
    weights: str | None = None
    activations: str | None = None
    scale_search: str | None = None
    method: str = "gptq"
    token_linears: int = 3
    smooth: bool = True
    smooth_alpha: float = 0.5
    act_rules: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    recipe_file: str | None = None
    embeddings: str | None = EMBEDDING_SPEC
    calib_text: str | None = None
    calib_samples: int = 64
    calib_length: int = 128
    sensitivity_sentences: int = 64
    opset: int = 21
    kv_cache: bool = True
    fuse: bool = False
    residual_sums: bool = True
    force: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LowbitError(f"unknown ONNX mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.method not in METHODS:
            raise LowbitError(f"unknown method {self.method!r} for ONNX export; use one of {', '.join(METHODS)}")
        if self.opset < 21 and self.mode != "float":
            raise LowbitError(f"quantized ONNX export needs opset 21 (int4 types, blocked and typed QuantizeLinear), "
                              f"got {self.opset}")
        if self.token_linears < 0 or self.calib_samples <= 0 or self.calib_length < 8:
            raise LowbitError("--token-linears must be >= 0, --calib-samples > 0 and --calib-length >= 8")
        if not 0.0 < self.smooth_alpha < 1.0:
            raise LowbitError(f"--smooth-alpha must lie strictly between 0 and 1, got {self.smooth_alpha}")


def onnx_recipe(opts: OnnxExportOptions, token_names: tuple[str, ...] = ()):
    """The recipe: a recipe file, or kept patterns, embeddings, per-token linears, activation rules, then
    every other Linear with the weight spec and the base activation spec."""
    from lowbit.formats.activation import parse_activation_spec
    from lowbit.formats.spec import parse_spec
    from lowbit.recipe import DEFAULT_IGNORE, Recipe, Rule, load_recipe
    from lowbit.schemes import get_scheme, weight_spec

    if opts.recipe_file:
        recipe = load_recipe(opts.recipe_file)
        return Recipe(recipe.scheme, opts.method, "fp32", recipe.rules, recipe.ignore, recipe.options)
    scheme = get_scheme(opts.scheme)
    weights = opts.weights or (INT8_WEIGHTS if opts.mode == "int8" and scheme.weights == "int8:channel" else None)
    spec = parse_spec(weights) if weights else weight_spec(scheme)
    if spec is None:
        raise LowbitError(f"scheme {scheme.name} quantizes nothing; for a float graph use --mode float")
    if opts.scale_search:
        spec = spec.with_options(scale_search=opts.scale_search)
    act = opts.activations or (TENSOR_ACT if opts.mode == "int8" and scheme.activations else scheme.activations)
    rules = [Rule(targets=(pattern,), spec=None) for pattern in opts.keep]
    if opts.embeddings:
        rules.append(Rule(targets=("Embedding",), spec=parse_spec(opts.embeddings)))
    rules += [Rule(targets=(name,), spec=spec, input_spec=parse_activation_spec(TOKEN_ACT)) for name in token_names]
    for text in opts.act_rules:
        if "=" not in text:
            raise LowbitError(f"activation rule {text!r} must look like PATTERN=ACTSPEC, "
                              "e.g. '*.output.dense=int8:token:dynamic'")
        pattern, act_text = (part.strip() for part in text.split("=", 1))
        rules.append(Rule(targets=(pattern,), spec=spec, input_spec=parse_activation_spec(act_text)))
    rules.append(Rule(targets=("Linear",), spec=spec, input_spec=parse_activation_spec(act) if act else None))
    return Recipe(scheme=scheme.name, method=opts.method, float_dtype="fp32", rules=tuple(rules), ignore=DEFAULT_IGNORE)


def default_out(opts: OnnxExportOptions) -> Path:
    model = Path(opts.model).stem if opts.model else "minilm"
    suffix = "fp32" if opts.mode == "float" else f"{opts.scheme.lower()}-{opts.mode}"
    return Path("out") / f"{model.lower()}-{suffix}.onnx"


def calibration_sentences(opts: OnnxExportOptions) -> list[str]:
    """Paragraphs for calibration: those after the evaluation paragraphs of the default text, or a file's."""
    from lowbit.data.text import load_text, paragraphs

    text = load_text(opts.calib_text)
    found = paragraphs(text, 10**9)
    skip = 0 if opts.calib_text else EVAL_PARAGRAPHS
    if len(found) <= skip:
        raise LowbitError(f"no calibration paragraphs left after the first {skip}; pass a longer --calib-text")
    return found[skip:]


def calibration_windows(tokenizer, sentences: list[str], samples: int, length: int):
    """(n, length) token windows cut from the calibration paragraphs joined together."""
    from lowbit.data.text import eval_windows, tokenize

    wanted, chars, used = samples * length * 8, 0, []  # ~8 characters per token is plenty for English prose
    for sentence in sentences:
        used.append(sentence)
        chars += len(sentence)
        if chars >= wanted:
            break
    return eval_windows(tokenize(tokenizer, "\n\n".join(used)), samples, length).ids


@dataclass(frozen=True)
class InputPlan:
    """How the linears' inputs are prepared before quantization: SmoothQuant scales for some (linear name ->
    per-channel scales) and per-token activation scales for others (names)."""

    smoothing: dict = field(default_factory=dict)
    token_linears: tuple[str, ...] = ()


def plan_inputs(loaded: LoadedModel, opts: OnnxExportOptions, sentences: list[str]) -> InputPlan:
    """Measure, on calibration sentences, which linears to smooth (``opts.smooth``) and which ``opts.token_linears``
    then still lose the most to per-tensor input scales. Nothing to plan for recipe files or per-token bases."""
    from lowbit.export.onnx_sensitivity import choose_smoothing, linear_names, most_sensitive, per_tensor_losses
    from lowbit.formats.activation import parse_activation_spec

    recipe = onnx_recipe(opts)
    base = [r.input_spec for r in recipe.rules if "Linear" in r.targets][0]
    if (opts.token_linears == 0 and not opts.smooth) or opts.recipe_file or base is None or base.granularity == "token":
        return InputPlan()
    names = linear_names(loaded.model, recipe)
    spec = parse_activation_spec(str(base))
    used = sentences[:opts.sensitivity_sentences]
    losses = per_tensor_losses(loaded.model, loaded.tokenizer, used, names, spec)
    smoothing = {}
    if opts.smooth:
        smoothing, losses = choose_smoothing(loaded.model, loaded.tokenizer, used, names, spec, losses,
                                             opts.smooth_alpha)
    return InputPlan(smoothing, tuple(most_sensitive(losses, opts.token_linears)))


def apply_smoothing(model, plan: InputPlan) -> None:
    """Attach the plan's input smoothing to ``model`` (before any input quantizer)."""
    from lowbit.transforms.input_smoothing import attach_input_smoothing

    modules = dict(model.named_modules())
    for name, scales in plan.smoothing.items():
        attach_input_smoothing(modules[name], scales)


def check_graph(proto) -> None:
    """onnx.checker's full check of ``proto``, its first complaint as a one-line error."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise LowbitError(f"the ONNX graph failed onnx.checker: {str(exc).splitlines()[0]}") from None


def require_onnx() -> None:
    """A one-line error when the optional ``onnx`` package is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise LowbitError("ONNX export needs the onnx package: pip install 'lowbit[onnx]'") from None


def build_onnx(loaded: LoadedModel, opts: OnnxExportOptions, progress: bool = False):
    """(ONNX ModelProto, QuantizedModel or None, module -> lowering) for ``loaded`` under ``opts``.

    The model is quantized in place (it becomes its fake-quant twin) unless the mode is ``float``.
    """
    from lowbit.export.onnx_lower import lower_quantized
    from lowbit.export.onnx_trace import trace_encoder
    from lowbit.model.apply import quantize_model

    require_onnx()
    if loaded.kind == CAUSAL_LM:
        return causal_lm_float_onnx(loaded, opts), None, {}
    if loaded.kind != ENCODER:
        raise LowbitError(f"ONNX export handles encoders and causal LMs; {loaded.source} is a {loaded.kind}")
    if opts.mode == "float":
        return _finished(trace_encoder(loaded.model, loaded.tokenizer, opts.opset), opts), None, {}
    needs_calibration = opts.method == "gptq" or ((opts.token_linears or opts.smooth) and not opts.recipe_file)
    sentences = calibration_sentences(opts) if needs_calibration else []
    plan = plan_inputs(loaded, opts, sentences) if sentences else InputPlan()
    apply_smoothing(loaded.model, plan)
    recipe = onnx_recipe(opts, plan.token_linears)
    if opts.method == "gptq":
        from lowbit.pipeline.calibrated import quantize_calibrated

        windows = calibration_windows(loaded.tokenizer, sentences, opts.calib_samples, opts.calib_length)
        quantized = quantize_calibrated(loaded.model, recipe, windows, batch_size=8, progress=progress)
    else:
        quantized = quantize_model(loaded.model, recipe, progress=progress)
    proto = trace_encoder(quantized.model, loaded.tokenizer, opts.opset)
    lowering = lower_quantized(proto, quantized, integer=opts.mode == "int8", fuse=opts.fuse)
    return _finished(proto, opts), quantized, lowering


def _finished(proto, opts: OnnxExportOptions):
    """An encoder graph with its residual Adds as Sum (if ``opts.residual_sums``) and its shapes inferred."""
    from lowbit.export.onnx_graph import with_inferred_shapes
    from lowbit.export.onnx_lower import residual_sums

    if opts.residual_sums:
        residual_sums(proto.graph)
    return with_inferred_shapes(proto)


def causal_lm_float_onnx(loaded: LoadedModel, opts: OnnxExportOptions):
    """The float graph of a causal LM (with a KV cache unless ``opts.kv_cache`` is off: then input_ids -> logits).
    Quantized LM graphs are written from a lowbit checkpoint, so that every method's codes (GPTQ, AWQ, ...)
    reach the graph unchanged."""
    from lowbit.export.onnx_compact import compact
    from lowbit.export.onnx_graph import with_inferred_shapes
    from lowbit.export.onnx_trace import trace_lm

    if opts.mode != "float":
        raise LowbitError(f"{loaded.source} is a causal LM: quantize it first and export the checkpoint, e.g. "
                          "'lowbit quantize --scheme W4A16 --method gptq --format lowbit,onnx' or "
                          "'lowbit export onnx OUT_DIR'; --mode float writes its float graph")
    proto = trace_lm(loaded.model, opts.opset, opts.kv_cache)
    compact(proto)
    return with_inferred_shapes(proto)


def export_onnx(opts: OnnxExportOptions, loaded: LoadedModel | None = None, progress: bool = False) -> dict[str, Any]:
    """Quantize, trace, rewrite, check and write one ONNX file; returns a summary (path, bytes, lowering)."""
    require_onnx()
    import onnx

    from lowbit.io_utils import atomic_file

    start = time.perf_counter()
    out = Path(opts.out) if opts.out else default_out(opts)
    if out.exists() and not opts.force:
        raise LowbitError(f"output {out} already exists; choose another --out or pass --force to replace it")
    loaded = loaded or load_model(opts.model or "minilm")
    proto, quantized, lowering = build_onnx(loaded, opts, progress=progress)
    check_graph(proto)
    with atomic_file(out, force=opts.force) as tmp:
        onnx.save_model(proto, str(tmp))
    from lowbit.export.onnx_kv import has_kv_cache
    from lowbit.transforms.input_smoothing import input_smoothings

    return {"path": str(out), "bytes": out.stat().st_size, "mode": opts.mode, "kv_cache": has_kv_cache(proto),
            "recipe": None if quantized is None else quantized.recipe.to_dict(),
            "smoothed": [] if quantized is None else sorted(input_smoothings(quantized.model)),
            "lowering": lowering, "opset": opts.opset, "seconds": round(time.perf_counter() - start, 2)}
