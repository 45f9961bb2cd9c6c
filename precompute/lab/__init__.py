"""The mechanism lab: planted ground truth (`synth`), steering (`steer`; maths in `steering`, the result
file in `steering_results`), fine-tuning (`finetune`), eval activations (`eval_acts`), the before/after
diff (`diff`), patch-back (`patch`) and dataset triage (`triage`). Each command module declares its
`COMMANDS`; `harm_geometry` is what diff, patch and triage read from a precompute cache."""
