"""The block-by-block calibration pipeline: observe, transform, quantize, propagate — one block at a time."""
