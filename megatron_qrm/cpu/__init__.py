"""Everything that exists only for CPU runs (tests, the demo): behind one wall.

* :mod:`~megatron_qrm.cpu.emulation`: the CUDA emulation megatron-core needs on a CPU-only machine
  (``torch.cuda.current_device()`` and friends, the RNG tracker, ``device="cuda"`` factories). Installed by
  :func:`enable`, which process initialisation (:func:`megatron_qrm.parallel.initialize`) calls only when the
  process has no CUDA; it refuses to run on a machine with CUDA.
* :mod:`~megatron_qrm.cpu.kernels`: CPU-tuned compute for the local spec and the KV-cache decoder (MKL's
  pre-packed GEMM for small decode batches, the SwiGLU function the fused GPU kernel replaces, the spec
  customisation that plugs them in).

The GPU path (``models/``, ``rl/``, ``training/``) never imports this package, except through
:mod:`megatron_qrm.models.backend`, the one place that chooses the CPU kernels for a CPU run.
``tests/test_gpu_path.py`` imports and builds the GPU-path modules with this package unimportable.
"""

from megatron_qrm.cpu.emulation import enable, function_mode_suspended, is_enabled

__all__ = ["enable", "function_mode_suspended", "is_enabled"]
