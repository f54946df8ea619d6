"""``qrm serve``: a trained reward model answers over HTTP with per-token credits (see docs/serving.md).

Modules: :mod:`.encoding` (texts -> the training layout's ids, token spans), :mod:`.scorer` (the model on
every rank of a TP x PP layout), :mod:`.batcher` (dynamic batching), :mod:`.app` (FastAPI endpoints),
:mod:`.metrics` (Prometheus), :mod:`.server` (lifecycle), :mod:`.client` (Python clients),
:mod:`.verl_adapter` (verl reward manager with token-level rewards).
"""
