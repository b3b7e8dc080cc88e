"""``lowbit analyze``: how much each linear (and each block, and the embedding/head) costs in KL divergence at
each candidate precision, measured and predicted.

Per linear: the true end-to-end KLD on calibration windows when only that linear is quantized at the probe
candidate (``candidates.probe_candidate``), and two cheap proxies for every candidate from one calibration
pass (``statistics``: Hessian-weighted output error, and its Fisher-weighted form in nats). The Spearman rank
correlation of each proxy with the measured KLD says whether the cheap score can be trusted on this model.
Per block: the measured KLD with the whole block at each candidate. Embedding and untied head: measured at
each candidate (they are few and cheap to run).

The allocator needs a KLD for every (linear, candidate). It uses the Fisher proxy rescaled per linear so that
it equals the measured KLD at the probe (``predicted``): the measurement fixes each layer's level, the proxy
its slope across precisions.

Results are cached under ``~/.cache/lowbit/sensitivity`` (``LOWBIT_CACHE``) by a fingerprint of the model file,
the candidates and the calibration data, so a second run (or ``quantize --target-bpw``) is instant.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import __version__
from lowbit.analysis.candidates import KEEP, Candidate, candidates_for, default_candidates, probe_candidate
from lowbit.analysis.measure import KLDProbe
from lowbit.analysis.statistics import LinearStats, collect_proxy_stats, fisher_proxy, hessian_proxy
from lowbit.data.text import calibration_windows, load_text, text_label, tokenize
from lowbit.errors import LowbitError
from lowbit.io_utils import atomic_file
from lowbit.model.load import CAUSAL_LM, LoadedModel, load_model

SENSITIVITY_VERSION = 1
EVAL_TOKENS = 8 * 512  # the default evaluation windows: sensitivity windows come after them in the same text


@dataclass(frozen=True)
class AnalyzeOptions:
    """What ``lowbit analyze`` (and ``quantize --target-bpw``) measures, and on which tokens."""

    model: str | None = None
    candidates: tuple[str, ...] = ()  # empty: default_candidates for the format
    formats: tuple[str, ...] = ("lowbit",)
    group_size: int | None = None
    symmetric: bool | None = None
    float_dtype: str = "fp16"
    calib_text: str | None = None
    calib_samples: int = 16  # windows for the Hessian/Fisher statistics
    calib_length: int = 512
    kld_samples: int = 2  # of those, windows on which the true KLD is measured ...
    kld_length: int = 256  # ... cut to this many tokens (the measurement is the expensive part)
    kld_dtype: str = "fp32"  # bf16 passes put a floor of ~1e-3 under every measured KLD (rounding flips
    # amplified downstream), as large as a whole int8 block's true KLD: measured in fp32 by default
    eval_tokens: int = EVAL_TOKENS
    seed: int = 0
    compute_dtype: str = "auto"
    blocks: bool = True  # also measure whole blocks at each candidate
    heads: bool = True  # the token embedding and an untied head are candidates too
    cache: bool = True

    def candidate_set(self) -> tuple[Candidate, ...]:
        texts = self.candidates or default_candidates(self.group_size, self.symmetric, "gguf" in self.formats)
        return candidates_for(texts, self.formats, self.float_dtype, explicit=bool(self.candidates))

    def for_allocation(self) -> tuple["AnalyzeOptions", tuple[str, ...] | None]:
        """(what to analyze, which candidates the allocation may pick; None: all of them). Candidates that are a
        subset of the default set restrict the allocation over the default (cached) analysis, so that trying
        another candidate set costs no new measurement."""
        if not self.candidates:
            return self, None
        chosen = self.candidate_set()  # validates them for the formats
        defaults = replace(self, candidates=()).candidate_set()
        default_names = {c.name for c in defaults}
        if all(c.name in default_names for c in chosen):
            return replace(self, candidates=()), tuple(c.name for c in chosen)
        return self, None


@dataclass
class ModuleSensitivity:
    """One weight's measurements: its shape, fusion group, bits and proxies per candidate, measured KLD."""

    name: str
    shape: tuple[int, int]
    kind: str  # "linear" | "embedding" | "head"
    group: str
    bits: dict[str, int]
    hessian: dict[str, float] = field(default_factory=dict)
    fisher: dict[str, float] = field(default_factory=dict)
    kld: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    probe: str = ""  # the candidate measured end to end: the run's probe, or the nearest one this shape fits

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class Sensitivity:
    """Everything ``lowbit analyze`` found; the content of sensitivity.json."""

    model: str
    fingerprint: str
    candidates: list[str]
    probe: str
    gguf: bool
    modules: list[ModuleSensitivity]
    blocks: list[dict[str, Any]]
    spearman: dict[str, float | None]
    calibration: dict[str, Any]
    seconds: dict[str, float]
    cached: bool = False

    def module(self, name: str) -> ModuleSensitivity:
        return next(m for m in self.modules if m.name == name)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("cached")
        return {"lowbit_sensitivity": SENSITIVITY_VERSION, "lowbit_version": __version__, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Sensitivity":
        data = {k: v for k, v in data.items() if k not in ("lowbit_sensitivity", "lowbit_version")}
        modules = [ModuleSensitivity(**{**m, "shape": tuple(m["shape"])}) for m in data.pop("modules")]
        return cls(modules=modules, **data)


def fingerprint(loaded: LoadedModel, opts: AnalyzeOptions, candidates: tuple[Candidate, ...]) -> str:
    """A hash of what the results depend on: the model file(s), candidates, calibration data and options."""
    h = hashlib.sha256()
    source = Path(loaded.source)
    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    # The resolved candidate names stand for the options that only choose them (grouping, symmetry, formats).
    fields = {k: v for k, v in asdict(opts).items()
              if k not in ("model", "cache", "candidates", "formats", "group_size", "symmetric")}
    h.update(json.dumps([SENSITIVITY_VERSION, [c.name for c in candidates], fields], sort_keys=True).encode())
    return h.hexdigest()[:20]


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "sensitivity"


def analyze(opts: AnalyzeOptions, loaded: LoadedModel | None = None, progress: bool = True) -> Sensitivity:
    """Measure (or read from the cache) the sensitivity of ``opts.model``."""
    candidates = opts.candidate_set()
    loaded = loaded or load_model(opts.model)
    if loaded.kind != CAUSAL_LM:
        raise LowbitError("sensitivity analysis measures next-token KL divergence: it needs a causal language model, "
                          f"and {loaded.source} is an encoder")
    key = fingerprint(loaded, opts, candidates)
    path = cache_dir() / f"{key}.json"
    if opts.cache and path.is_file():
        try:
            result = Sensitivity.from_dict(json.loads(path.read_text()))
            result.cached = True
            return result
        except (ValueError, TypeError, KeyError):
            pass  # an unreadable cache entry is recomputed
    result = _measure(loaded, opts, candidates, key, progress)
    if opts.cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, force=True) as tmp:
            Path(tmp).write_text(json.dumps(result.to_dict()))
    return result


def _compute_dtype(name: str) -> torch.dtype:
    from lowbit.hardware import cpu_has_bf16

    if name == "auto":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def _windows(loaded: LoadedModel, opts: AnalyzeOptions) -> tuple[torch.Tensor, dict[str, Any]]:
    ids = tokenize(loaded.tokenizer, load_text(opts.calib_text))
    skip = opts.eval_tokens if opts.calib_text is None else 0
    windows = calibration_windows(ids, opts.calib_samples, opts.calib_length, eval_tokens=skip, seed=opts.seed)
    if windows.ids.shape[0] < max(opts.calib_samples, opts.kld_samples):
        raise LowbitError(f"the calibration text gives only {windows.ids.shape[0]} windows of {opts.calib_length} "
                          f"tokens; pass a longer --calib-text or fewer --calib-samples")
    return windows.ids, {"text": text_label(opts.calib_text), "samples": int(windows.ids.shape[0]),
                         "length": opts.calib_length, "first_token": skip, "seed": opts.seed,
                         "kld_windows": opts.kld_samples, "kld_length": opts.kld_length}


def _targets(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear inside the repeated blocks (the head and embedding are handled apart)."""
    from lowbit.pipeline.layers import find_blocks

    prefix, blocks = find_blocks(model)
    out = {}
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                out[f"{prefix}.{i}.{name}" if prefix else f"{i}.{name}"] = module
    if not out:
        raise LowbitError("found no linear layer inside the model's blocks to analyze")
    return out


def _heads(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(name, kind, module) of the token embedding and of an untied output head."""
    from lowbit.model.embeddings import head_names

    emb, head, tied = head_names(model)
    modules = dict(model.named_modules())
    out = [(emb, "embedding", modules[emb])] if emb and isinstance(modules[emb], nn.Embedding) else []
    if head and not tied and isinstance(modules[head], nn.Linear):
        out.append((head, "head", modules[head]))
    return out


def _measure(loaded: LoadedModel, opts: AnalyzeOptions, candidates: tuple[Candidate, ...], key: str,
             progress: bool) -> Sensitivity:
    t0 = time.perf_counter()
    model = loaded.model.eval()
    dtype = _compute_dtype(opts.compute_dtype)
    windows, calibration = _windows(loaded, opts)
    calibration["dtype"] = "bf16" if dtype == torch.bfloat16 else "fp32"
    calibration["kld_dtype"] = opts.kld_dtype
    targets = _targets(model)
    stats = collect_proxy_stats(model, targets, windows, batch_size=2, seed=opts.seed, compute_dtype=dtype,
                                progress=progress)
    t1 = time.perf_counter()
    probe_cand = probe_candidate(candidates)
    modules: list[ModuleSensitivity] = []
    deltas: dict[str, torch.Tensor] = {}  # the probe's weight change per linear, reused by the measurement
    for name, module in tqdm(targets.items(), desc="proxies", disable=not progress):
        w = module.weight.detach().float()
        s = stats.linears[name]
        m = ModuleSensitivity(name, tuple(w.shape), "linear", s.group, {})
        m.probe = nearest_fitting(candidates, probe_cand, w.shape).name
        for cand in candidates:
            if not cand.fits(*w.shape):
                continue
            m.bits[cand.name] = cand.bits(*w.shape)
            delta = cand.dequantized(w, s.importance()) - w
            m.hessian[cand.name], m.fisher[cand.name] = hessian_proxy(delta, s), fisher_proxy(delta, s)
            if cand.name == m.probe:
                deltas[name] = delta
        modules.append(m)
    t2 = time.perf_counter()
    probe = KLDProbe(model, windows[: opts.kld_samples, : opts.kld_length], _compute_dtype(opts.kld_dtype))
    for m in tqdm(modules, desc=f"KLD per linear at {probe_cand.name}", disable=not progress):
        if m.name in deltas:
            weight = targets[m.name].weight
            m.kld[m.probe] = probe.kld_with({weight: weight.detach().float() + deltas[m.name]},
                                                    probe.block_index(m.name))
    del deltas
    t3 = time.perf_counter()
    blocks = _measure_blocks(probe, targets, candidates, stats.linears, progress) if opts.blocks else []

    if opts.heads:
        modules += _measure_heads(probe, model, candidates, stats.linears, progress)
    t4 = time.perf_counter()
    _predict(modules)
    return Sensitivity(
        model=loaded.source, fingerprint=key, candidates=[c.name for c in candidates], probe=probe_cand.name,
        gguf=any(c.is_gguf for c in candidates), modules=modules, blocks=blocks,
        spearman=_spearman(modules), calibration=calibration,
        seconds={"statistics": t1 - t0, "proxies": t2 - t1, "kld_linears": t3 - t2, "kld_blocks_heads": t4 - t3,
                 "total": time.perf_counter() - t0})


def _measure_blocks(probe: KLDProbe, targets: dict[str, nn.Linear], candidates: tuple[Candidate, ...],
                    stats: dict[str, LinearStats], progress: bool) -> list[dict[str, Any]]:
    """Measured KLD with every linear of one block at one candidate, for each block and candidate."""
    out = []
    per_block: dict[int, list[str]] = {}
    for name in targets:
        per_block.setdefault(probe.block_index(name), []).append(name)
    reference = probe_candidate(candidates)
    work = [(i, c) for i in sorted(per_block) for c in candidates if _block_candidate(c, reference)]
    results: dict[int, dict[str, float]] = {}
    for index, cand in tqdm(work, desc="KLD per block", disable=not progress):
        names = [n for n in per_block[index] if cand.fits(*targets[n].weight.shape)]
        if len(names) != len(per_block[index]):
            continue
        weights = {targets[n].weight: cand.dequantized(targets[n].weight, stats[n].importance()) for n in names}
        results.setdefault(index, {})[cand.name] = probe.kld_with(weights, index)
    for index in sorted(per_block):
        out.append({"index": index, "modules": per_block[index], "kld": results.get(index, {})})
    return out


def _block_candidate(c: Candidate, probe: Candidate) -> bool:
    """Whole blocks are measured at the quantized candidates below 16 bits with the probe's granularity
    (int2..int6 in the probe's groups and int8 per channel; every GGUF type): the per-block table of the report."""
    if c.is_gguf:
        return c.bits_per_weight() < 16
    if c.spec is None:
        return False
    same = probe.spec is not None and (c.spec.granularity, c.spec.group_size) == (probe.spec.granularity,
                                                                                 probe.spec.group_size)
    return same or c.spec.granularity == "channel"


def _measure_heads(probe: KLDProbe, model: nn.Module, candidates: tuple[Candidate, ...],
                   stats: dict[str, LinearStats], progress: bool) -> list[ModuleSensitivity]:
    """The embedding and an untied head, measured at every candidate (their proxies would need their own
    statistics; each measurement is one forward pass of the model, and a restricted --candidates set may pick
    any of them)."""
    out = []
    last = len(probe.blocks) - 1
    for name, kind, module in _heads(model):
        w = module.weight.detach().float()
        m = ModuleSensitivity(name, tuple(w.shape), kind, name, {})
        for cand in tqdm(candidates, desc=f"KLD of {name}", disable=not progress):
            if not cand.fits(*w.shape):
                continue
            m.bits[cand.name] = cand.bits(*w.shape)
            if cand.spec is None and not cand.is_gguf:
                m.kld[cand.name] = 0.0 if cand.float_bits >= 16 else float("nan")
                continue
            start = None if kind == "embedding" else last
            m.kld[cand.name] = probe.kld_with({module.weight: cand.dequantized(w)}, start)
        m.predicted = dict(m.kld)
        out.append(m)
    return out


def nearest_fitting(candidates: tuple[Candidate, ...], probe: Candidate, shape: tuple[int, ...]) -> Candidate:
    """``probe`` if it fits the shape, else the fitting quantized candidate nearest to it in bits per weight."""
    fitting = [c for c in candidates if c.fits(*shape) and (c.spec is not None or c.is_gguf)]
    if probe in fitting or not fitting:
        return probe
    target = probe.bits_per_weight()
    return min(fitting, key=lambda c: (abs(c.bits_per_weight() - target), c.bits_per_weight()))


def _predict(modules: list[ModuleSensitivity]) -> None:
    """predicted[c] for every linear: its Fisher proxy at c times (measured / Fisher) at its probe, that ratio
    bounded to [1/10, 10] x the median ratio; linears without a usable ratio take the median."""
    ratios = [m.kld[m.probe] / m.fisher[m.probe] for m in modules
              if m.kind == "linear" and m.probe in m.kld and m.fisher.get(m.probe, 0) > 0]
    median = float(torch.tensor(ratios).median()) if ratios else 1.0
    for m in modules:
        if m.kind != "linear":
            continue
        f = m.fisher.get(m.probe, 0.0)
        ratio = m.kld[m.probe] / f if m.probe in m.kld and f > 0 else median
        ratio = min(max(ratio, median / 10), median * 10)
        m.predicted = {c: (0.0 if c == KEEP else ratio * v) for c, v in m.fisher.items()}
        if KEEP in m.bits:
            m.predicted[KEEP] = 0.0


def _spearman(modules: list[ModuleSensitivity]) -> dict[str, float | None]:
    """Rank correlation over linears between each proxy at a linear's probe and the KLD measured there."""
    from scipy.stats import spearmanr

    rows = [m for m in modules if m.kind == "linear" and m.probe in m.kld and m.probe in m.fisher]
    if len(rows) < 3:
        return {"hessian": None, "fisher": None, "modules": len(rows)}
    true = [m.kld[m.probe] for m in rows]
    out: dict[str, float | None] = {}
    for proxy in ("hessian", "fisher"):
        rho = spearmanr([getattr(m, proxy)[m.probe] for m in rows], true).statistic
        out[proxy] = None if rho is None or math.isnan(rho) else float(rho)
    out["modules"] = len(rows)
    return out
