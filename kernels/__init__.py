"""qvlm kernels: the packed format, pack/unpack, reference ops and fast kernels.

Imported as ``qvlm_kernels`` (a top-level ``kernels`` package would shadow Hugging
Face's ``kernels`` library). Importing this package never imports vLLM or Triton.
"""
