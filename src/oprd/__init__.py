"""oprd: on-policy distillation of language models (OPRD and the OPD baselines)."""

__version__ = "0.1.0"
