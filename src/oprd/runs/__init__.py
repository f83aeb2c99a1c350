"""The run folder: everything a training run writes, and the rules for reusing it.

    output_dir/
      config.yaml, configs/       the run's config, and every segment's      (recorder)
      metrics.jsonl, gates.json   one line per step; each gate's verdicts     (recorder)
      run.json                    code, models, data, cost, segments          (provenance)
      checkpoints/step_*/         atomic, resumable                           (checkpoint)
      final/, best/               plain HF model folders                      (checkpoint)
      report.md, report/          `oprd report`                               (report)

  folder      one run per folder (its lock), what overwrite and resume may do with it
  recorder    the files above besides checkpoints, the console and the progress bar
  provenance  run.json and the model card
  checkpoint  checkpoints, their resume, and the exported model folders
  report      `oprd report` and `oprd compare`

This package reads the config and writes files; it never imports the trainer, the rollout or the
objective, so the trainer, the CLI and the experiments can all use it.
"""
