"""Quantization-aware training: fake-quant layers with STE/LSQ gradients, distillation loop, resumable state."""
