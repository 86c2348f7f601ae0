"""One file per architecture, named after the HF `model_type`."""
