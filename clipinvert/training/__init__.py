"""Training CLIPInverter adapters and remappers: data sets, losses, the training loop."""
