"""Training a TopK SAE on a model's activations."""
