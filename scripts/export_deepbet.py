#!/usr/bin/env python
"""Export deepbet's two networks to a NumPy weight file for the torch-free Keras port.

Run once, at development time, in an environment with the ``deepbet-torch``
extra installed (``pip install -e '.[deepbet-torch]'``)::

    python scripts/export_deepbet.py            # writes ms3seg_app/data/deepbet/
    python scripts/export_deepbet.py --check    # also compares Keras and torch outputs

deepbet 1.0.2 (https://github.com/wwu-mmll/deepbet, MIT licence, (c) 2023 Medical
Machine Learning Lab - University of Muenster) ships two TorchScript LinkNet3d
models, ``bbox_model.pt`` (128^3 input, finds the head's bounding box) and
``model.pt`` (256^3 input, segments the brain in that box).  Both are traced
modules with the same architecture, which ``ms3seg_app.brain_extraction``
rebuilds in Keras.  This script writes their parameters unchanged (PyTorch
layout, float32) into ``deepbet_1.0.2_linknet3d.npz`` with keys
``bbox_model/<torch name>`` and ``model/<torch name>``, copies deepbet's licence
and writes a README with the deepbet version, source and the sha256 of the
weight file.  It also checks that every convolution's stride, padding and
output padding in the TorchScript code are the ones the Keras port assumes.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "ms3seg_app" / "data" / "deepbet"
WEIGHTS_NAME = "deepbet_1.0.2_linknet3d.npz"
EXPECTED_VERSION = "1.0.2"

# (module kind, stride, padding, output padding) per torch module name pattern,
# as the Keras port in ms3seg_app/brain_extraction.py hard-codes them.
_CONV_RE = re.compile(
    r"torch\._convolution\(\w+, \w+, (\w+), \[(\d), \d, \d\], \[(\d), \d, \d\], "
    r"\[1, 1, 1\], (True|False), \[(\d), \d, \d\], 1,"
)


def _expected_conv(name: str) -> tuple[bool, int, int, int]:
    """(transposed, stride, padding, output_padding) the Keras port uses for *name*."""
    if name == "init.0":
        return False, 2, 3, 0
    if name == "tp_conv2":
        return True, 2, 0, 0
    if name == "tp_conv1.0":
        return True, 2, 1, 1
    if name == "conv.0":
        return False, 1, 1, 0
    m = re.fullmatch(r"down(\d)\.block(\d)\.(double_conv\.(\d)|downsample\.0)", name)
    if m:
        first_of_stage = m.group(2) == "1" and m.group(1) != "0"
        if m.group(3) == "downsample.0":
            return False, 2, 0, 0
        stride = 2 if (first_of_stage and m.group(4) == "0") else 1
        return False, stride, 1, 0
    m = re.fullmatch(r"up(\d)\.(conv1|tp_conv|conv2)\.0", name)
    if m:
        if m.group(2) != "tp_conv":
            return False, 1, 0, 0
        return (True, 1, 1, 0) if m.group(1) == "3" else (True, 2, 1, 1)
    raise ValueError(f"unexpected convolution {name}")


def check_architecture(scripted) -> None:
    """Raise if the TorchScript module differs from what the Keras port rebuilds."""
    code = scripted.code
    for tok in ("torch.softmax(", "torch.add(_5, _4)", "(up3).forward(_2, input1, ), _0"):
        if tok not in code:
            raise RuntimeError(f"top-level forward changed: {tok!r} missing")
    n_conv = 0
    for name, mod in scripted.named_modules():
        kind = mod.original_name
        if kind in ("Conv3d", "ConvTranspose3d"):
            m = _CONV_RE.search(mod.code)
            if m is None:
                raise RuntimeError(f"cannot parse {name}: {mod.code}")
            got = (m.group(4) == "True", int(m.group(2)), int(m.group(3)), int(m.group(5)))
            if got != _expected_conv(name):
                raise RuntimeError(f"{name}: {got} != expected {_expected_conv(name)}")
            n_conv += 1
        elif kind == "InstanceNorm3d":
            if "None, None, None, None, True, 0.1" not in mod.code or "1.0000000000000001e-05" not in mod.code:
                raise RuntimeError(f"{name}: instance norm is not the affine-free eps=1e-5 kind")
        elif kind == "MaxPool3d":
            if "[3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1]" not in mod.code:
                raise RuntimeError(f"{name}: max pool changed")
    if n_conv != 35:
        raise RuntimeError(f"{n_conv} convolutions, expected 35")


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` with fixed zip timestamps, so re-exporting gives the same sha256."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[key]), allow_pickle=False)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true", help="compare Keras and torch outputs on random input")
    args = ap.parse_args(argv)

    import torch  # noqa: F401  (dev-time only)
    import deepbet.utils

    version = metadata.version("deepbet")
    if version != EXPECTED_VERSION:
        print(f"warning: deepbet {version} installed, port written for {EXPECTED_VERSION}", file=sys.stderr)
    models_dir = Path(deepbet.utils.DATA_PATH) / "models"
    arrays: dict[str, np.ndarray] = {}
    sources = {}
    for net in ("bbox_model", "model"):
        pt = models_dir / f"{net}.pt"
        scripted = torch.jit.load(str(pt), map_location="cpu")
        check_architecture(scripted)
        for k, v in scripted.state_dict().items():
            arrays[f"{net}/{k}"] = v.detach().cpu().numpy().astype(np.float32)
        sources[net] = (pt.name, sha256(pt))

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / WEIGHTS_NAME
    write_npz(weights, arrays)
    digest = sha256(weights)

    dist = metadata.distribution("deepbet")
    lic = next((Path(dist.locate_file(f)) for f in (dist.files or []) if Path(str(f)).name == "LICENSE"), None)
    if lic is None or not lic.is_file():
        raise SystemExit("deepbet's LICENSE not found in its package metadata")
    shutil.copyfile(lic, args.out / "LICENSE")

    n_params = sum(a.size for a in arrays.values())
    (args.out / "README.md").write_text(
        f"""# deepbet weights (Keras port)

`{WEIGHTS_NAME}` holds the parameters of the two networks of
[deepbet](https://github.com/wwu-mmll/deepbet) {version}
(PyPI `deepbet=={version}`, files `data/models/bbox_model.pt` and
`data/models/model.pt`), copied unchanged (float32, PyTorch layout
`(out, in, D, H, W)` for `Conv3d`, `(in, out, D, H, W)` for `ConvTranspose3d`)
by `scripts/export_deepbet.py`.  `ms3seg_app/brain_extraction.py` rebuilds the
LinkNet3d architecture in Keras and loads them, so brain extraction needs no
PyTorch.

- deepbet licence: MIT, (c) 2023 Medical Machine Learning Lab - University of
  Muenster; see `LICENSE` in this folder (copied from deepbet's wheel).
- Paper: Fisch et al., "deepbet: Fast brain extraction of T1-weighted MRI using
  Convolutional Neural Networks", Computers in Biology and Medicine (2024).
- Source TorchScript files: `{sources['bbox_model'][0]}` sha256 `{sources['bbox_model'][1]}`,
  `{sources['model'][0]}` sha256 `{sources['model'][1]}`.
- `{WEIGHTS_NAME}`: {len(arrays)} arrays, {n_params} parameters,
  {weights.stat().st_size} bytes, sha256 `{digest}`.
"""
    )
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB, sha256 {digest})")

    if args.check:
        _check_against_torch(models_dir)
    return 0


def _check_against_torch(models_dir: Path) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from ms3seg_app import brain_extraction as be

    be._NETS.clear()
    rng = np.random.default_rng(0)
    for net, size in (("bbox_model", 64), ("model", 64)):
        x = rng.normal(0.45, 0.22, (1, 1, size, size, size)).astype(np.float32)
        ref = torch.jit.load(str(models_dir / f"{net}.pt"), map_location="cpu")
        with torch.no_grad():
            want = ref(torch.from_numpy(x))[0, 1].numpy()
        got = be._predict(net, x[0, 0])
        print(f"{net}: max |keras - torch| on {size}^3 random input = {np.abs(got - want).max():.2e}")


if __name__ == "__main__":
    raise SystemExit(main())
