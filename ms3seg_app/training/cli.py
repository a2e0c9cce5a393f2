"""``ms3seg-train``: the command line of training, cross-validation and ensemble assembly.

Kept apart from the library modules so that :mod:`.train`, :mod:`.validate` and
:mod:`.bids_data` import one another one way only (the command line imports them all).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import train
from .bids_data import train_from_bids
from .train import LOGGER, TrainConfig, run_cv
from .validate import assemble_ensemble


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    ens = sub.add_parser("ensemble", help="validate the fold models and write them as the bundled ensemble")
    ens.add_argument("--data", type=Path, required=True, help="development data folder")
    ens.add_argument("--cv", type=Path, required=True, help="folder of a finished 'cv' run")
    ens.add_argument("--dest", type=Path, required=True, help="where to write the members and their card")
    for name in ("cv", "bids"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
        p.add_argument("--base-filters", type=int, default=TrainConfig.base_filters)
        p.add_argument("--seed", type=int, default=0)
        if name == "cv":
            p.add_argument("--data", type=Path, required=True, help="development data folder")
        p.add_argument("--exclusion-weight", type=float, default=TrainConfig.exclusion_weight)
        p.add_argument("--patience", type=int, default=TrainConfig.patience)
        p.add_argument("--crop", type=int, default=TrainConfig.crop)
        p.add_argument("--nwmh-oversample", type=int, default=TrainConfig.nwmh_oversample,
                       help="draw slices holding labelled normal WMH this many times per epoch")
        p.add_argument("--nwmh-ce-weight", type=float, default=TrainConfig.nwmh_ce_weight,
                       help="cross-entropy weight of normal-WMH voxels (others 1)")
        p.add_argument("--external-per-epoch", type=int, default=TrainConfig.external_per_epoch,
                       help="external (other-site) slices drawn per epoch")
        p.add_argument("--keep", choices=["last", "best"], default=TrainConfig.keep,
                       help="keep the final weights (default) or those of the best validation epoch")
        if name == "cv":
            p.add_argument("-k", type=int, default=3)
            p.add_argument("--folds", type=int, nargs="*")
        if name == "bids":
            p.add_argument("--bids-dir", type=Path, required=True)
            p.add_argument("--labels-dir", type=Path, required=True,
                           help="derivatives folder with *_desc-manual_dseg.nii.gz on the FLAIR grids")
            p.add_argument("--init", type=Path, help="weights to fine-tune from")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cmd == "ensemble":
        LOGGER.info("wrote %s", assemble_ensemble(args.data, args.cv, args.dest))
        return 0
    cfg = TrainConfig(epochs=args.epochs, base_filters=args.base_filters, seed=args.seed,
                      exclusion_weight=args.exclusion_weight, patience=args.patience, crop=args.crop,
                      nwmh_oversample=args.nwmh_oversample, nwmh_ce_weight=args.nwmh_ce_weight,
                      external_per_epoch=args.external_per_epoch, keep=args.keep)
    if args.cmd == "cv":
        LOGGER.info("fold models: %s; score them with the 'ensemble' command", run_cv(args.data, args.out, cfg,
                                                                                         args.k, args.folds))
    else:
        LOGGER.info("wrote %s", train_from_bids(args.bids_dir, args.labels_dir, args.out, cfg, args.init))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
