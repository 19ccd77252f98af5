"""Infer and train tasks of the scse_monai MONAI Label app."""
