"""Model cards: the single source of truth about a model, parsed once and validated.

A card is a JSON file that travels with the weights (after MONAI bundles'
``metadata.json``). It names the class table (names, abbreviations, colours), the input
channels, the architecture (``type`` looked up in :data:`ARCHITECTURES`), every
preprocessing and post-processing parameter, the geometry the model was trained on,
training provenance, validation results, and the weights with their sha256. Inference,
derivatives, reports and the group level read all of this from the card; nothing about
a model is hard-coded elsewhere.

Two layouts are read:

single model
    ``<stem>_model_card.json`` beside ``<stem>.keras`` or ``<stem>.h5`` (MS3SEG's
    published format), with ``"sha256"`` of the weights.
ensemble
    ``<name>_model_card.json`` with ``"members": [{"file": ..., "sha256": ...}, ...]``,
    files relative to the card; their softmax outputs are averaged (nnU-Net's
    cross-validation ensemble).

The card file's own sha256 identifies the model (it contains every member's sha256 and
every parameter): outputs record it, and resume compares it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import LESION_CLASS  # noqa: F401  (re-exported: callers name it from here too)
from ..exceptions import ModelError

LOGGER = logging.getLogger("ms3seg.model")

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
#: Environment variable naming another model (card or weights file), after nnU-Net's ``paths.py``.
WEIGHTS_ENV = "MS3SEG_WEIGHTS"
CARD_SUFFIX = "_model_card.json"
REQUIRED_KEYS = ("name", "architecture", "input", "preprocessing", "classes")


def class_index(classes, abbreviation: str, where: str = "class table") -> int:
    """Label value of the class abbreviated ``abbreviation`` in a sequence of :class:`ClassInfo`.

    Raises
    ------
    ModelError
        If no class has this abbreviation (the message names ``where``).
    """
    for c in classes:
        if c.abbreviation == abbreviation:
            return c.index
    raise ModelError(f"{where} has no class {abbreviation!r}")


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _build_unet2d(card: "ModelCard"):
    from .unet import build_unet

    arch = card.architecture
    return build_unet((None, None, card.input_channels), n_classes=card.n_classes,
                      base_filters=int(arch["base_filters"]), depth=int(arch.get("depth", 4)),
                      dropout=0.0, use_bias=bool(arch.get("conv_bias", True)))


#: Architecture ``type`` of a card -> builder taking the card (used for ``.h5`` weights,
#: which hold no architecture, and to check a ``.keras`` file against its card).
ARCHITECTURES = {"unet2d": _build_unet2d}


@dataclass(frozen=True)
class ClassInfo:
    """One class of a segmentation: label value, name, BIDS-style abbreviation, display colour."""

    index: int
    name: str
    abbreviation: str
    color: str


@dataclass(frozen=True)
class Member:
    """One weights file of a model (an ensemble has several)."""

    path: Path
    sha256: str


@dataclass(frozen=True)
class ModelCard:
    """A validated model card.

    Attributes
    ----------
    path : Path or None
        The card file (None for an in-memory card during training).
    name : str
    classes : tuple of ClassInfo
        Indices 0..n-1 in order; 0 is the background.
    input_channels : int
        Channels of the network input (the card's ``input.shape[-1]``).
    architecture : dict
        ``type`` (a key of :data:`ARCHITECTURES`) and its parameters.
    preprocessing, postprocessing, training_geometry : dict
    members : tuple of Member
        Weights files (one for a single model).
    data : dict
        The whole JSON (provenance, validation, software versions).
    sha256 : str
        sha256 of the card file (of its canonical JSON for an in-memory card).
    """

    path: Path | None
    name: str
    classes: tuple
    input_channels: int
    architecture: dict
    preprocessing: dict
    postprocessing: dict
    training_geometry: dict
    members: tuple
    data: dict = field(repr=False)
    sha256: str = ""

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def foreground(self) -> tuple:
        """Classes other than the background (index 0)."""
        return self.classes[1:]

    def class_index(self, abbreviation: str) -> int:
        """Label value of the class with this abbreviation (e.g. ``"AWMH"``).

        Raises
        ------
        ModelError
            If the card has no such class.
        """
        return class_index(self.classes, abbreviation, f"model card {self.name!r}")

    def member_indices(self, members=None) -> tuple:
        """Validated 0-based indices into :attr:`members`, sorted, each once (``None``: all).

        The one rule for ``--members``: the parser, the loader, the run key and the sidecars
        all go through it.

        Raises
        ------
        ModelError
            An index the card does not have, or no index at all.
        """
        n = len(self.members)
        if members is None:
            return tuple(range(n))
        chosen = tuple(sorted({int(i) for i in members}))
        bad = [i for i in chosen if not 0 <= i < n]
        if bad or not chosen:
            raise ModelError(f"members {' '.join(map(str, bad or chosen))} asked for: model {self.name} has {n} "
                             f"member(s), numbered 0-{n - 1} (ms3seg --info lists them); give indices in that range")
        return chosen

    @property
    def lesion_class(self) -> int:
        """Label value of the MS-lesion class (:data:`LESION_CLASS`); ModelError if absent."""
        return self.class_index(LESION_CLASS)

    @classmethod
    def from_dict(cls, data: dict, path: Path | None = None, sha256: str | None = None) -> "ModelCard":
        """Validate a card's JSON.

        Parameters
        ----------
        data : dict
            Parsed card.
        path : Path, optional
            The card file (member paths are relative to its folder).
        sha256 : str, optional
            sha256 of the file's bytes; default the sha256 of the canonical JSON.

        Raises
        ------
        ModelError
            Missing keys, a class table that is not 0..n-1 with names, an unknown
            architecture or normalisation, or no weights named.
        """
        where = str(path) if path else "model card"
        for key in REQUIRED_KEYS:
            if key not in data:
                raise ModelError(f"{where}: the model card lacks the key {key!r}")
        try:
            classes = tuple(ClassInfo(int(c["index"]), str(c.get("name", f"class {c['index']}")),
                                      str(c.get("abbreviation", f"C{c['index']}")), str(c.get("color", "#888888")))
                            for c in data["classes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: malformed classes table ({exc})") from exc
        if [c.index for c in classes] != list(range(len(classes))) or len(classes) < 2:
            raise ModelError(f"{where}: classes must be numbered 0..n-1 (n >= 2), got "
                             f"{[c.index for c in classes]}")
        arch = dict(data["architecture"])
        if arch.get("type") not in ARCHITECTURES:
            raise ModelError(f"{where}: unknown architecture type {arch.get('type')!r}; "
                             f"known: {sorted(ARCHITECTURES)}")
        shape = data["input"].get("shape") or [None, None, None, 1]
        try:
            channels = int(shape[-1])
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}: input.shape must end with the channel count, got {shape}") from exc
        from ..preprocessing.normalize import METHODS

        pre = dict(data["preprocessing"])
        method = pre.get("normalization", {}).get("method")
        if method not in METHODS:
            raise ModelError(f"{where}: unknown normalisation {method!r}; known: {METHODS}")
        base = path.parent if path else Path(".")
        if "members" in data:
            members = tuple(Member(base / m["file"], str(m["sha256"])) for m in data["members"])
        elif "sha256" in data and path is not None:
            stem = path.name[: -len(CARD_SUFFIX)] if path.name.endswith(CARD_SUFFIX) else path.stem
            wfile = data.get("weights_file") or next(
                (f"{stem}{ext}" for ext in (".keras", ".h5") if (base / f"{stem}{ext}").exists()), f"{stem}.keras")
            members = (Member(base / wfile, str(data["sha256"])),)
        else:
            members = ()
        if path is not None and not members:
            raise ModelError(f"{where}: the card names no weights (a 'members' list or 'sha256')")
        digest = sha256 or hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        return cls(path, str(data["name"]), classes, channels, arch, pre, dict(data.get("postprocessing", {})),
                   dict(data.get("training_geometry", {})), members, data, digest)


def card_path_for(weights: Path | str) -> Path:
    """``<dir>/<stem>_model_card.json`` for ``<dir>/<stem>.keras|.h5``."""
    w = Path(weights)
    return w.with_name(f"{w.stem}{CARD_SUFFIX}")


def bundled_card() -> Path:
    """The card of the model shipped in the package (the only ``*_model_card.json`` in ``data/``).

    Raises
    ------
    ModelError
        If none or several are bundled.
    """
    found = sorted(DATA_DIR.glob(f"*{CARD_SUFFIX}"))
    if len(found) != 1:
        raise ModelError(f"expected exactly one bundled model card in {DATA_DIR}, found {len(found)}; "
                         f"reinstall ms3seg-app or pass --model / set {WEIGHTS_ENV}")
    return found[0]


def resolve_card(model: Path | str | None = None) -> Path:
    """The card to use: ``model`` (a card, or a weights file with its card beside it),
    else ``$MS3SEG_WEIGHTS``, else the bundled card.

    Raises
    ------
    ModelError
        If the named file or its card does not exist.
    """
    if model:
        p = Path(model)
    elif os.environ.get(WEIGHTS_ENV):
        p = Path(os.environ[WEIGHTS_ENV])
    else:
        return bundled_card()
    if not p.is_file():
        raise ModelError(f"model file {p} does not exist (from --model or ${WEIGHTS_ENV})")
    if p.name.endswith(".json"):
        return p
    cp = card_path_for(p)
    if not cp.is_file():
        raise ModelError(f"no model card {cp.name} beside {p}: every model needs its card "
                         "(see ms3seg_app/data/*_model_card.json for the format)")
    return cp


def load_card(model: Path | str | None = None) -> ModelCard:
    """Read and validate the card of ``model`` (see :func:`resolve_card`).

    Raises
    ------
    ModelError
        Missing or unreadable card, or a card that fails :meth:`ModelCard.from_dict`.
    """
    cp = resolve_card(model)
    try:
        raw = cp.read_bytes()
        data = json.loads(raw)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"model card {cp} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"model card {cp} must hold a JSON object")
    return ModelCard.from_dict(data, cp, hashlib.sha256(raw).hexdigest())


def verify_member(member: Member) -> None:
    """Check a weights file against the sha256 its card records.

    Raises
    ------
    ModelError
        Missing file, or a mismatch (a tampered, truncated or swapped weights file).
    """
    if not member.path.is_file():
        raise ModelError(f"weights file {member.path} named by the model card does not exist")
    digest = sha256_file(member.path)
    if digest != member.sha256:
        raise ModelError(
            f"{member.path}: sha256 {digest[:16]}... differs from its model card ({member.sha256[:16]}...). "
            "The file was modified or belongs to another card; reinstall the package or retrain. "
            "Pass --allow-unverified-model only if you trust the file.")


def verify_net_in_out(model, card: ModelCard, where: str = "model") -> None:
    """Check a network against its card with a dummy forward pass (after MONAI's ``verify_net_in_out``).

    Parameters
    ----------
    model : keras.Model
    card : ModelCard
    where : str
        Names the file in the message.

    Raises
    ------
    ModelError
        If the network does not take ``card.input_channels`` channels or does not output
        ``card.n_classes`` channels summing to 1 (softmax).
    """
    import numpy as np

    try:
        out = model(np.zeros((1, 64, 64, card.input_channels), np.float32), training=False)
        out = np.asarray(out)
    except Exception as exc:  # keras raises ValueError / InvalidArgumentError variants
        raise ModelError(f"{where}: the network does not accept the card's input of "
                         f"{card.input_channels} channel(s): {exc}") from exc
    if out.shape[-1] != card.n_classes:
        raise ModelError(f"{where}: the network outputs {out.shape[-1]} channels, its card lists "
                         f"{card.n_classes} classes")
    if not np.allclose(out.sum(axis=-1), 1.0, atol=1e-3):
        raise ModelError(f"{where}: the network's output is not a softmax over the card's classes")


def check_member(member: Member, allow_unverified: bool = False) -> None:
    """:func:`verify_member`, or with ``allow_unverified`` a warning for a mismatch (a missing
    file is refused either way)."""
    try:
        verify_member(member)
    except ModelError:
        if not allow_unverified or not member.path.is_file():
            raise
        LOGGER.warning("loading %s although its sha256 differs from the card", member.path)


def load_member(member: Member, card: ModelCard, allow_unverified: bool = False, verified: bool = False):
    """Load one weights file of a card, verified.

    ``.keras`` files load in Keras safe mode (no arbitrary code: lambda layers are
    refused) unless ``allow_unverified``; ``.h5`` files (MS3SEG's published format) are
    loaded as weights into the card's architecture from :data:`ARCHITECTURES`, so no code
    from the file ever runs. ``verified``: :func:`check_member` was called already (its
    sha256 is not computed again).

    Returns
    -------
    keras.Model

    Raises
    ------
    ModelError
        Hash mismatch, custom code, or a network that disagrees with the card.
    """
    import keras

    from . import losses  # noqa: F401  (registers MarginalDiceCE for deserialisation)

    if not verified:
        check_member(member, allow_unverified)
    try:
        if member.path.suffix == ".h5":
            model = ARCHITECTURES[card.architecture["type"]](card)
            model.load_weights(str(member.path))
        else:
            model = keras.saving.load_model(str(member.path), compile=False, safe_mode=not allow_unverified)
    except Exception as exc:  # keras raises ValueError/TypeError/OSError variants
        raise ModelError(f"cannot load {member.path}: {exc}. If the file contains custom code it is refused "
                         "by Keras safe mode; pass --allow-unverified-model only if you trust it.") from exc
    verify_net_in_out(model, card, str(member.path))
    return model


def load_model(model: Path | str | None = None, allow_unverified: bool = False, members=None):
    """Load a model's card and its members' networks, verified.

    Parameters
    ----------
    model : path, optional
        A card, or a ``.keras``/``.h5`` file with its card beside it; default
        ``$MS3SEG_WEIGHTS`` or the bundled model.
    allow_unverified : bool
        Accept a sha256 mismatch and unsafe deserialisation (logged as a warning).
    members : sequence of int, optional
        Indices into the card's ``members`` list (0-based) of the networks to load;
        default all.

    Returns
    -------
    (list of keras.Model, ModelCard)
        The networks in the order of ``members``.

    Raises
    ------
    ModelError
        See :func:`load_card` and :func:`load_member`; an index in ``members`` that the
        card does not have.
    """
    card = load_card(model)
    return load_members(card, card.member_indices(members), allow_unverified), card


def load_members(card: ModelCard, indices, allow_unverified: bool = False, verified: bool = False) -> list:
    """The networks of the card's members ``indices`` (0-based, in that order), each loaded by
    :func:`load_member` (``verified``: their files were checked already, :func:`check_member`)."""
    return [load_member(card.members[i], card, allow_unverified, verified) for i in indices]


def write_card(card: dict, weights: Path | str) -> Path:
    """Write a single-model ``card`` (with the weights' sha256 filled in) beside ``weights``."""
    card = dict(card)
    card["sha256"] = sha256_file(weights)
    card["weights_file"] = Path(weights).name
    cp = card_path_for(weights)
    cp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return cp


def write_ensemble_card(card: dict, members: list, dest: Path) -> Path:
    """Write an ensemble card naming ``members`` (weights files in ``dest``'s folder).

    Parameters
    ----------
    card : dict
        Card content without ``members``/``sha256``.
    members : list of Path
        Weights files, in the card's folder.
    dest : Path
        The card file to write (``*_model_card.json``).
    """
    card = {k: v for k, v in card.items() if k not in ("sha256", "weights_file")}
    card["members"] = [{"file": Path(m).name, "sha256": sha256_file(m)} for m in members]
    dest.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return dest


def describe_installed_model(model: Path | str | None = None) -> str:
    """Lines describing the model that would be used (for ``ms3seg --info``); loads no network.

    Raises
    ------
    ModelError
        If the card cannot be found or read.
    """
    card = load_card(model)
    lines = [f"model: {card.name} ({card.path})", f"model card sha256: {card.sha256}",
             f"members: {len(card.members)}"]
    lines += [f"  {i}: {m.path.name} sha256 {m.sha256}" for i, m in enumerate(card.members)]  # --members takes i
    lines.append("classes: " + ", ".join(f"{c.index} {c.name} ({c.abbreviation})" for c in card.classes))
    cv = card.data.get("cross_validation", {}).get("mean", {})
    if cv:
        lines.append("cross-validation Dice: " + ", ".join(
            f"{k} {v['dice']:.2f}" for k, v in cv.items() if isinstance(v, dict) and "dice" in v))
    return "\n".join(lines)
