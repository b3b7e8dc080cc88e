"""The factor GPTQ's error feedback reads: the upper Cholesky factor U of H^-1 (H^-1 = U^T U).

The textbook route is three cubic steps: factor H, invert it from its factor, factor the inverse (4/3 n^3
flops). With J the reversal permutation, J H J = L L^T gives H^-1 = (J L^-T J)(J L^-1 J), and J L^-1 J is upper
triangular with a positive diagonal, so it *is* U: one factorization and one triangular inverse (2/3 n^3).
The triangular inverse is blocked, its bulk in matrix products (a solve against the identity would cost
n^3 again). Measured, one thread, fp32, damped SmolLM2 Hessians: 1536 inputs 150 -> 89 ms, 576 inputs 11.8 ->
7.6 ms; U equal to the three-step result to 6e-8 relative.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

LEAF = 128  # blocks this small are inverted by a triangular solve against the identity


def upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """U, upper triangular with a positive diagonal, such that U^T U = h^-1 (``h`` symmetric positive definite).

    Raises ``torch.linalg.LinAlgError`` when ``h`` is not positive definite."""
    lower = torch.linalg.cholesky(h.flip(0, 1))
    return lower_triangular_inverse(lower).flip(0, 1)


def damped_upper_inverse_cholesky(h: torch.Tensor, damp: float, name: str, attempts: int = 6) -> torch.Tensor:
    """U of (h + d * mean(diag h) * I)^-1, d = ``damp`` first, then ten times more on each failure (a Hessian
    of too few or collinear inputs is only semi-definite); computed in ``h``'s dtype. Raises LowbitError naming
    ``name`` when even ``damp * 10**(attempts-1)`` does not make it definite. GPTQ and the GGUF error feedback
    both read their factor from here."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    mean_diag = h.diagonal().mean()
    for attempt in range(attempts):
        try:
            return upper_inverse_cholesky(h + eye * (damp * 10**attempt) * mean_diag)
        except torch.linalg.LinAlgError:
            continue
    raise LowbitError(f"{name}: the input Hessian is not positive definite even with strong dampening")


def lower_triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """The inverse of a lower triangular matrix, by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]."""
    n = lower.shape[0]
    if n <= LEAF:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
    half = n // 2
    a_inv = lower_triangular_inverse(lower[:half, :half])
    c_inv = lower_triangular_inverse(lower[half:, half:])
    out = torch.zeros_like(lower)
    out[:half, :half] = a_inv
    out[half:, half:] = c_inv
    out[half:, :half] = (c_inv @ (lower[half:, :half] @ a_inv)).neg_()
    return out
