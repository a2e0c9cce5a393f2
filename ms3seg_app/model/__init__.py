from .card import load_model, sha256_file

__all__ = ["load_model", "sha256_file"]
