"""SE segmentation networks (filled in by the networks module)."""
