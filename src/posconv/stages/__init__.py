"""The DVC stages of dvc.yaml, one thin module each: read params, call the library, write outputs."""
