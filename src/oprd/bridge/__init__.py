"""OPRD-Bridge: distil from a teacher of another depth, width or tokenizer through frozen low-rank
projectors (`projector`), fitted in Stage 1 on the student's own rollouts (`stage1`).

Stage 2 is ordinary OPRD on the projected states: set `bridge.path` in a training recipe
(`oprd.objective` applies the projectors).
"""

from oprd.alignment import align_by_offsets, matched_share
from oprd.bridge.projector import (
    Bridge,
    Pair,
    bridge_metadata,
    fit_bridge,
    fit_student_projector,
    fit_teacher_pca,
    load_bridge,
    save_bridge,
    split_rows,
    unit_rms,
    vocab_hash,
)

STAGE1 = ("PairedRows", "RowReservoir", "layer_pairs", "paired_rows_from_batches")


def __getattr__(name: str):
    """Stage 1's names load Stage 1 on first use: the trainer, which reads only the projectors,
    never runs Stage 1's program code (its rollouts, its row reservoir)."""
    if name in STAGE1:
        from oprd.bridge import stage1

        return getattr(stage1, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Bridge", "Pair", "PairedRows", "RowReservoir", "align_by_offsets", "bridge_metadata", "fit_bridge",
    "fit_student_projector", "fit_teacher_pca", "layer_pairs", "load_bridge", "matched_share",
    "paired_rows_from_batches", "save_bridge", "split_rows", "unit_rms", "vocab_hash",
]
