"""The mechanism lab: planted ground truth, steering, fine-tuning, before/after diff, patch-back, triage."""
