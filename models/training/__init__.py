"""Training recipes that reproduce the committed checkpoints under models/weights/."""
