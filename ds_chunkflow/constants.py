"""Constants shared by the data loaders and the loss (no imports: every layer may use them)."""

IGNORE_INDEX = -100  # transformers' label convention: no loss on this position
