"""Model cards: the JSON that travels with a weights file, and verified loading.

A card (``<stem>_model_card.json`` beside ``<stem>.keras`` or ``<stem>.h5``) records
the architecture, the input specification, every preprocessing parameter inference
needs, the class table, training provenance, cross-validation results, software
versions and the weights' sha256 (after MONAI bundles' ``metadata.json``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..exceptions import ModelError

LOGGER = logging.getLogger("ms3seg.model")

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
#: Environment variable naming another weights file (after nnU-Net's ``paths.py``).
WEIGHTS_ENV = "MS3SEG_WEIGHTS"


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def card_path_for(weights: Path | str) -> Path:
    """``<dir>/<stem>_model_card.json`` for ``<dir>/<stem>.keras|.h5``."""
    w = Path(weights)
    return w.with_name(f"{w.stem}_model_card.json")


def bundled_weights() -> Path:
    """The weights shipped in the package (the only ``*.keras`` in ``ms3seg_app/data``).

    Raises
    ------
    ModelError
        If none or several are bundled.
    """
    found = sorted(DATA_DIR.glob("*.keras"))
    if len(found) != 1:
        raise ModelError(f"expected exactly one bundled .keras file in {DATA_DIR}, found {len(found)}; "
                         f"reinstall ms3seg-app or pass --model / set {WEIGHTS_ENV}")
    return found[0]


def resolve_weights(model: Path | str | None = None) -> Path:
    """Weights to use: ``model`` argument, else ``$MS3SEG_WEIGHTS``, else the bundled file."""
    if model:
        p = Path(model)
    elif os.environ.get(WEIGHTS_ENV):
        p = Path(os.environ[WEIGHTS_ENV])
    else:
        return bundled_weights()
    if not p.is_file():
        raise ModelError(f"model file {p} does not exist (from --model or ${WEIGHTS_ENV})")
    return p


def read_card(weights: Path | str) -> dict:
    """Read and check the card of a weights file.

    Raises
    ------
    ModelError
        If the card is missing, unreadable, or lacks a required key.
    """
    cp = card_path_for(weights)
    if not cp.is_file():
        raise ModelError(f"no model card {cp.name} beside {weights}: every model needs its card "
                         "(see ms3seg_app/data/*_model_card.json for the format)")
    try:
        card = json.loads(cp.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card {cp} is not valid JSON: {exc}") from exc
    for key in ("architecture", "input", "preprocessing", "classes", "sha256"):
        if key not in card:
            raise ModelError(f"model card {cp} lacks the key {key!r}")
    return card


def verify_weights(weights: Path | str, card: dict) -> str:
    """Check the weights' sha256 against the card; return it.

    Raises
    ------
    ModelError
        On mismatch (a tampered, truncated or swapped weights file).
    """
    digest = sha256_file(weights)
    if digest != card["sha256"]:
        raise ModelError(
            f"{weights}: sha256 {digest[:16]}... differs from its model card ({card['sha256'][:16]}...). "
            "The file was modified or belongs to another card; reinstall the package or retrain. "
            "Pass --allow-unverified-model only if you trust the file.")
    return digest


def load_model(weights: Path | str | None = None, allow_unverified: bool = False):
    """Load a model and its card, verifying integrity.

    ``.keras`` files load with Keras safe mode (no arbitrary code: lambda layers are
    refused) unless ``allow_unverified``; ``.h5`` files (MS3SEG's published format)
    are loaded as weights into :func:`~ms3seg_app.model.unet.build_unet` built from
    the card, so no code from the file ever runs.

    Parameters
    ----------
    weights : path, optional
        ``.keras`` or ``.h5``; default: :func:`resolve_weights`.
    allow_unverified : bool
        Accept a sha256 mismatch and unsafe deserialisation (logged as a warning).

    Returns
    -------
    (keras.Model, dict card, Path weights)

    Raises
    ------
    ModelError
        Missing card, hash mismatch, custom code, or an input spec the card contradicts.
    """
    import keras

    from . import losses  # noqa: F401  (registers MarginalDiceCE for deserialisation)
    from .unet import build_unet

    path = resolve_weights(weights)
    card = read_card(path)
    try:
        verify_weights(path, card)
    except ModelError:
        if not allow_unverified:
            raise
        LOGGER.warning("loading %s although its sha256 differs from the card", path)
    arch = card["architecture"]
    try:
        if path.suffix == ".h5":
            model = build_unet(tuple(card["input"]["shape"][1:]), n_classes=len(card["classes"]),
                               base_filters=arch["base_filters"], depth=arch.get("depth", 4),
                               dropout=0.0, use_bias=arch.get("conv_bias", True))
            model.load_weights(str(path))
        else:
            model = keras.saving.load_model(str(path), compile=False, safe_mode=not allow_unverified)
    except Exception as exc:  # keras raises ValueError/TypeError/OSError variants
        raise ModelError(f"cannot load {path}: {exc}. If the file contains custom code it is refused "
                         "by Keras safe mode; pass --allow-unverified-model only if you trust it.") from exc
    n_out = int(model.output_shape[-1])
    if n_out != len(card["classes"]):
        raise ModelError(f"{path}: model has {n_out} outputs, its card lists {len(card['classes'])} classes")
    return model, card, path


def write_card(card: dict, weights: Path | str) -> Path:
    """Write ``card`` (with the weights' sha256 filled in) beside ``weights``."""
    card = dict(card)
    card["sha256"] = sha256_file(weights)
    card["weights_file"] = Path(weights).name
    cp = card_path_for(weights)
    cp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return cp
