"""Pydantic request and response models: the JSON contract that clients rely on."""
