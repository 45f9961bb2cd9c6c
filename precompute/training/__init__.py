"""Training a TopK SAE on a model's activations (`featuregeom train-sae`).

config: the command's options; store: held-out split, activation store, batch order; trainer: the
TopK SAE and its optimisation loop; evaluation: held-out figures; command: the run that ties them."""
