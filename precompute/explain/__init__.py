"""`featuregeom explain`: natural-language explanations of features by a language model, each with a
detection score (can the explanation tell the feature's activating contexts from matched ones where it
never fires?). Package layout: prompts (what the models read), clients (local transformers model or an
OpenAI-compatible endpoint), detection (the held-out contexts and the score), command (the CLI)."""
