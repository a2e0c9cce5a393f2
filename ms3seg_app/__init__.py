"""ms3seg-app: MS3SEG tri-mask segmentation of FLAIR MRI as a BIDS App.

The tri-mask (Bashiri Bawil et al., MS3SEG, Scientific Data 2025) labels every voxel
as 0 background, 1 ventricles, 2 normal white-matter hyperintensity (WMH) or
3 abnormal WMH (MS lesions).
"""
import os as _os
from importlib.metadata import PackageNotFoundError, version as _version

# No network at run time: nipype otherwise asks etelemetry for updates on import.
_os.environ.setdefault("NIPYPE_NO_ET", "1")

try:
    __version__ = _version("ms3seg-app")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

#: Tri-mask classes: index -> (name, BIDS-style abbreviation, MS3SEG colour).
CLASSES = {
    0: ("background", "BG", "#000000"),
    1: ("ventricles", "VEN", "#0000ff"),
    2: ("normal WMH", "NWMH", "#00ff00"),
    3: ("abnormal WMH", "AWMH", "#ff0000"),
}
#: Label value of each tri-mask class by abbreviation (``LABELS["AWMH"] == 3``): the defaults
#: of functions that also take a model card's own values.
LABELS = {abbr: index for index, (_, abbr, _) in CLASSES.items()}
#: Abbreviation of the MS-lesion class (abnormal WMH): the class of the lesion table, the
#: lesion burden and the per-voxel uncertainty map.
LESION_CLASS = "AWMH"
