"""The balancing study (`balancebeam study`): an experiment runner, not a Beam job.

It makes synthetic data (trainer.synth), runs the pipeline's jobs to build each variant of it,
trains and evaluates a model per variant, schedule and seed (trainer), and writes the results.
It lives apart from the Beam jobs because it drives them and the trainer from above:

- `config`: the study's YAML (`configs/study.yaml` is the shipped one), checked and typed;
- `runner`: builds the variants, trains and evaluates every unit, resumable (`balancebeam study`);
- `data_bias`: the data's RB / AB as the study measures them (subsets, labels, directions);
- `results`: paired comparisons across seeds, results.json, results.md and the plot.
"""
