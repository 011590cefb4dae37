"""Training: the recipe and the two-stage loop that runs it.

`config` (the validated `RecipeConfig`), `recipe` (its steps as small functions), `stages` (the
resumable loop), `tuner` (`TwoStageFineTuner`), and what they lean on: `checkpoint`, `precision`,
`optimizers`, `dropout`.

May import: `kerasft.runs`, `kerasft.labelling`, `kerasft.data`, `kerasft.model`,
`kerasft.devices`, `kerasft.tokens`, `kerasft.util`. Never the CLI, exporters or benchmarks.
"""
