"""GGUF block formats (legacy, k-quants, ternary, MXFP4), named mixes, imatrix files and error feedback."""
