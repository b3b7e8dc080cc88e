"""A linear layer that trains through its own quantization: latent float weights, learned steps and zero points.

``QATLinear`` computes with ``dequantize(quantize(W))`` in every forward pass, on the grid of one QuantSpec,
with gradients from the straight-through estimator (rounding passes the gradient unchanged, clipping stops it)
and LSQ steps (Esser et al., 2020: the step's gradient is the rounding residual inside the grid and the clip
level outside it, scaled by 1/sqrt(block elements * qmax) so steps learn at the pace of the weights).
The step is also rounded to the spec's scale dtype in the forward pass (STE again), and the zero point to
an integer, so what trains is exactly what is written: ``to_qtensor`` returns the codes, scales and zero
points of the current forward pass, and ``dequantize`` of it equals the forward weight bit for bit.

It starts from a post-training result (``from_qtensor``): the latent weight is the PTQ model's dequantized
weight and the steps/zeros are the PTQ scales, so step 0 computes exactly what RTN, GPTQ or AWQ produced.

Trainable grids: integer (2-8 bits, symmetric or with a zero point), ternary and binary, per channel or per
group along the input dimension, with fp32/fp16/bf16 scales. Other specs (float and table formats, NVFP4's
two-level scales, 2-D blocks) are refused by ``check_trainable`` with the reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.qtensor import QTensor
from lowbit.formats.registry import get_format
from lowbit.formats.scales import SCALE_TORCH_DTYPES
from lowbit.formats.spec import QuantSpec
from lowbit.training.ste import lsq_grad_scale, round_ste, scale_grad, sign_ste

TRAINABLE_FORMATS = ("int2", "int3", "int4", "int5", "int6", "int7", "int8", "ternary", "binary")
TRAINABLE_SCALES = ("fp32", "fp16", "bf16")


def check_trainable(spec: QuantSpec, name: str = "tensor") -> None:
    """Refuse, with the reason, a spec whose grid QAT cannot train."""
    if spec.format not in TRAINABLE_FORMATS:
        raise LowbitError(f"{name}: QAT cannot train {spec} ({spec.format} has no learnable uniform step); "
                          f"trainable formats: {', '.join(TRAINABLE_FORMATS)}")
    if spec.granularity not in ("channel", "group"):
        raise LowbitError(f"{name}: QAT trains per-channel or per-group specs, not {spec.granularity} ({spec})")
    if spec.scale_dtype not in TRAINABLE_SCALES:
        raise LowbitError(f"{name}: QAT cannot train {spec}: {spec.scale_dtype} scales (two-level or power-of-two) "
                          f"are not learnable steps; use fp16, bf16 or fp32 scales")


def _cast_ste(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to ``dtype`` (and back to x's dtype) in the forward pass; identity gradient."""
    if dtype == x.dtype:
        return x
    return x + (x.to(dtype).to(x.dtype) - x).detach()


class QATLinear(nn.Module):
    """nn.Linear replacement whose weight is fake-quantized on ``spec``'s grid with STE/LSQ gradients.

    Parameters: ``weight`` (latent float, out x in), ``step`` (out x n_groups, positive), ``zero`` (float,
    out x n_groups; asymmetric specs only) and ``bias`` if the original had one.
    """

    def __init__(self, weight: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                 bias: torch.Tensor | None = None):
        super().__init__()
        check_trainable(spec)
        self.spec = spec
        self.out_features, self.in_features = weight.shape
        _, self.block = spec.block_size(*weight.shape)
        self.groups = -(-self.in_features // self.block)
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.step = nn.Parameter(step.detach().to(torch.float32).clone().reshape(self.out_features, self.groups))
        self.zero = None if zero is None else nn.Parameter(zero.detach().to(torch.float32).clone().reshape(
            self.out_features, self.groups))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        fmt = get_format(spec.format)
        self.scale_dtype = SCALE_TORCH_DTYPES[spec.scale_dtype]
        if spec.format in ("binary", "ternary"):
            self.qmin, self.qmax = -1, 1
        elif spec.symmetric:
            self.qmin, self.qmax = fmt.signed_range()
        else:
            self.qmin, self.qmax = fmt.zero_range()
        self.zero_range = fmt.zero_range()
        self.grad_scale = lsq_grad_scale(self.block, float(max(abs(self.qmin), abs(self.qmax))))

    @classmethod
    def from_qtensor(cls, qt: QTensor, latent: torch.Tensor, bias: torch.Tensor | None = None) -> "QATLinear":
        """A QATLinear on ``qt``'s grid with its scales/zeros as steps/zero points and ``latent`` as weight."""
        check_trainable(qt.spec)
        if qt.global_scale is not None or len(qt.shape) != 2:
            raise LowbitError(f"QAT needs a 2-D linear weight on a one-level grid, got {qt.spec} {qt.shape}")
        zero = None if qt.zeros is None else qt.zeros.float()
        return cls(latent, qt.scales.float(), zero, qt.spec, bias)

    # -- the fake-quantized weight -------------------------------------------------------------------------
    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        pad = self.groups * self.block - self.in_features
        if pad:
            w = F.pad(w, (0, pad))
        return w.reshape(self.out_features, self.groups, self.block)

    def _step(self) -> torch.Tensor:
        s = scale_grad(self.step, self.grad_scale)
        return _cast_ste(s.abs().clamp_min(torch.finfo(self.scale_dtype).tiny), self.scale_dtype)[..., None]

    def _zero(self) -> torch.Tensor:
        return torch.clamp(round_ste(self.zero), *self.zero_range)[..., None]

    def _codes(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Integer grid values (as floats, with STE) of the grouped latent weights ``w`` for steps ``s``."""
        x = w / s
        if self.spec.format == "binary":
            return sign_ste(x)
        if self.zero is not None:
            z = self._zero()
            return torch.clamp(round_ste(x) + z, self.qmin, self.qmax) - z
        return torch.clamp(round_ste(x), self.qmin, self.qmax)

    def quantized_weight(self) -> torch.Tensor:
        """The weight this layer computes with: codes times steps, in the original (out, in) shape."""
        s = self._step()
        wq = self._codes(self._grouped(self.weight), s) * s
        return wq.reshape(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # -- what gets written ---------------------------------------------------------------------------------
    @torch.no_grad()
    def to_qtensor(self) -> QTensor:
        """Codes, scales and zero points of the current forward pass (dequantize(result) == quantized_weight())."""
        s = self._step()
        x = self._grouped(self.weight) / s
        zeros = None
        if self.spec.format == "binary":
            codes = (x >= 0).to(torch.int16)
        elif self.zero is not None:
            z = self._zero()
            codes = torch.clamp(torch.round(x) + z, self.qmin, self.qmax).to(torch.int16)
            zeros = z[..., 0].to(torch.int16)
        else:
            codes = torch.clamp(torch.round(x), self.qmin, self.qmax).to(torch.int16)
        codes = codes.reshape(self.out_features, -1)[:, : self.in_features].contiguous()
        scales = s[..., 0].to(self.scale_dtype).contiguous()
        return QTensor(codes=codes, scales=scales, zeros=zeros, spec=self.spec,
                       shape=(self.out_features, self.in_features))

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the current quantized weight (for evaluation and export)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.quantized_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec}"


def qat_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The QATLinear parameters of ``model`` by kind: latent weights (and biases) and quantization steps/zeros."""
    weights, quant = [], []
    for module in model.modules():
        if isinstance(module, QATLinear):
            weights.append(module.weight)
            if module.bias is not None:
                weights.append(module.bias)
            quant.append(module.step)
            if module.zero is not None:
                quant.append(module.zero)
    return {"weights": weights, "quant": quant}
