"""megatron-qrm: token-level Q-function reward models (Q-RM) and RL on Megatron-Core."""

__version__ = "0.1.0"


def _guard_broken_transformer_engine() -> None:
    """A partly installed Transformer Engine raises RuntimeError/OSError on import, and megatron-core
    only catches ImportError, so `import megatron.core` itself would fail. Mark TE absent instead; the
    layer-spec choice then logs the local spec."""
    import importlib
    import sys

    if "transformer_engine" in sys.modules:
        return
    try:
        importlib.import_module("transformer_engine")  # imported for its errors only
    except ImportError:
        pass
    except Exception:  # noqa: BLE001
        sys.modules["transformer_engine"] = None  # type: ignore[assignment]  # import now raises ImportError


_guard_broken_transformer_engine()
