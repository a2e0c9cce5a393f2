from .card import load_model, sha256_file
