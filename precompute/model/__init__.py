"""Loading a language model and reading its activations at a hook."""
