"""megatron-hybrid: Hybrid-LoRA (selective full fine-tuning + LoRA) for Megatron-Core.

See README.md and docs/ for usage; the public entry points are re-exported lazily from
:mod:`megatron_hybrid.peft` and :mod:`megatron_hybrid.runtime`.
"""

import warnings

# Megatron-Core warns at import time about every optional fused kernel it falls back from; on a
# CPU machine that is expected and drowns the useful output.
for _pattern in (
    ".*Apex.*",
    ".*Transformer Engine.*",
    ".*TransformerEngine.*",
    ".*full scope is deprecated.*",
):
    warnings.filterwarnings("ignore", message=_pattern)

__version__ = "0.1.0"
