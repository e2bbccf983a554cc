"""Small C kernels for the CPU, compiled on first use with the machine's C compiler (`build.load_library`).

- `fused`: RMSNorm, rotary embedding and SiLU-and-multiply, each one call instead of several torch ops
  (used by `RMSNorm`, `GQA` and `MLP` under `torch.inference_mode()` on the CPU).
- `matmul`: `F.linear` through a weight packed 16 outputs at a time, float32 and (with AVX512-BF16) bfloat16
  (packed `Linear` layers).
- `simd.h`: the vector types and helpers every kernel here and in other distributions shares
  (`astrai.inference`'s paged attention includes it too).
"""

from astrai.model.native.build import available_compiler, load_library

__all__ = ["available_compiler", "load_library"]
