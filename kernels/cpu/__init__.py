"""CPU kernels: small C kernels compiled at first use (csrc/, loaded through ctypes) and the GEMM
libraries' packed weight layouts, by concept:

- ``build``: compiling and loading the C library (``available()``, ``build_in_background()``);
- ``attention``: paged decode attention, and the cascade over a prefix the whole batch shares;
- ``elementwise``: rms_norm, silu_and_mul, rotary + KV-cache write, the constraint mask's ban;
- ``mkl_packed`` / ``onednn_packed``: float32 / bfloat16 matmul weights in the GEMM's own layout;
- ``int8``: W8A8 matmuls; ``stored``: matmuls reading a checkpoint's own format (``weight_gemv``);
- ``decode_step``: a whole few-row decode step in one C call;
- ``linear``: the faster forms of a matmul weight that the engine's CPU backend puts in the model.

Each kernel has a torch reference (kernels/reference.py, or a plain-torch twin beside it) that the tests
compare it with. The engine's CPU backend (forge_batch/engine/cpu_backend.py) decides which are used.
"""
