"""Mathematically equivalent rescalings applied before rounding (AWQ, SmoothQuant).

A transform moves per-channel scale between a linear layer's input and its weight columns, folding the
inverse into the operation that produces the input (a norm or a linear), so the float model computes the
same function. Quantization afterwards is a separate step.
"""
