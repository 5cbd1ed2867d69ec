"""Test and benchmark helpers: small random-weight stand-ins for the released checkpoints."""
