"""Train states, jitted steps and the training loop."""
