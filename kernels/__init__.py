"""Triton kernels for ssltk, each beside the plain-torch reference it is tested against."""
