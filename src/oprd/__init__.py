"""oprd: on-policy distillation of language models (OPRD and the OPD baselines).

The package, from the bottom up:

  the engine    config, models, shapes, answers, data, batch, rollout (and vllm_backend), capture,
                alignment, losses, objective, teachers, preflight, optim, files, gates, display,
                distributed, trainer
  runs/         the run folder: its lock and reuse (folder), what a run writes (recorder,
                provenance), checkpoints and exported models (checkpoint), `oprd report` (report)
  bridge/       OPRD-Bridge: frozen projectors (projector) and the Stage 1 fit (stage1, loaded
                on first use)
  evaluation/   grading, metrics, the benchmark harness and its reports, the trainer's validation
  experiments/  programs that use the library and are never used by it: the toy world, the
                demos, the rank sweep and the bench
  testing       offline fixtures: tiny model configs and locally trained tokenizers
  cli           the `oprd` command, thin wrappers over all of the above

Shape letters, used in names (`keep_B_T`, `teacher_h_N_D`) and docstrings throughout:

  B    sequences in a batch (prompts x responses per prompt)
  P    width of the left-padded prompt block
  T    width of the right-padded response block
  S    a model's input width, P + T - 1 (the last response token predicts nothing)
  N    selected positions, flattened over the batch in row-major order
  D    hidden size (D_S the student's, D_T the teacher's)
  V    vocabulary size
  K    top-k support size
  r    OPRD-Bridge rank
"""

__version__ = "0.1.0"
