"""Slice geometry shared by training and inference: native grid <-> model slices.

The model sees 2D axial slices of ``size x size`` pixels of ``pixel_size`` mm. This
module maps any 3D image onto that slice stack and back, exactly:

1. **Reorientation without interpolation.** The voxel axes are permuted and flipped
   to the closest RAS+ order (:func:`nibabel.orientations.io_orientation`). Axial,
   sagittal, coronal, flipped and obliquely stored images all become ``(X, Y, Z)``
   arrays whose third axis is the one closest to inferior->superior. An oblique
   2D acquisition is therefore sliced in its own acquisition plane, which is what a
   thick-slice clinical FLAIR needs (resampling it onto a world-aligned grid would
   smear 6 mm slices across the plane).
2. **In-plane resampling** of every slice to ``pixel_size`` mm, centred on the head,
   with centred padding/cropping to ``size x size`` (one affine map per slice, as
   MS3SEG's "rescale to 1x1 mm, then zero-pad/crop to 256x256", but with the
   geometry kept).
3. **The inverse** maps per-class probabilities (or any channels) back onto the
   input voxel grid (linear interpolation of probabilities, then argmax by the
   caller), so outputs have the input's shape and affine.

Slice arrays are ``(Z, H, W[, C])``: ``Z`` runs inferior->superior, ``H`` along
+x (towards Right) and ``W`` along +y (towards Anterior) of the reoriented image.
"""
from __future__ import annotations

from dataclasses import dataclass

import warnings

import nibabel as nib
import numpy as np
from scipy import ndimage

# A 1-D ``matrix`` in scipy's affine_transform means a diagonal map (the fast zoom path);
# scipy warns that this changed in 0.18, which is the behaviour we rely on.
warnings.filterwarnings("ignore", message="The behavior of affine_transform with a 1-D array",
                        category=UserWarning)

from ..exceptions import InputDataError

RAS_ORNT = nib.orientations.axcodes2ornt(("R", "A", "S"))
#: Model slices interpolated per call in :meth:`SliceGeometry.inverse` (bounds its working memory).
INVERSE_CHUNK_SLICES = 16


def head_threshold(data: np.ndarray) -> float:
    """Otsu threshold of an image's intensity histogram, for a head/foreground mask.

    Hand-written (12 lines) because scikit-image is not otherwise a dependency.

    Parameters
    ----------
    data : ndarray, any shape, real dtype
        Image intensities (finite).

    Returns
    -------
    float
        Threshold separating air from head (Otsu 1979, 256 bins).
    """
    # no float64 or clipped copy of the volume (a 512x512x300 scan would need 1.1 GB more):
    # values above the 99.9th percentile are counted in the last bin, as clipping would
    values = np.asarray(data).ravel()
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        values = values[finite]
    del finite
    lo, hi = np.percentile(values, [0.0, 99.9]) if values.size else (0.0, 0.0)
    if hi <= lo:
        return float(lo)
    hist, edges = np.histogram(values, bins=256, range=(lo, hi))
    hist[-1] += np.count_nonzero(values > hi)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def inferior_superior_axis(affine: np.ndarray) -> int:
    """The stored axis across axial slices, whatever the storage order.

    Parameters
    ----------
    affine : ndarray (4, 4)
        Voxel-to-world (RAS+, mm) affine.

    Returns
    -------
    int
        The voxel axis (0, 1 or 2) closest to inferior-superior in RAS+ (nibabel's
        ``io_orientation``).
    """
    ornt = nib.orientations.io_orientation(np.asarray(affine))
    return int(np.nonzero(ornt[:, 0] == 2)[0][0])


def axial_voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes along RAS+ x, y and z, whatever the storage order.

    Parameters
    ----------
    affine : ndarray (4, 4)
        Voxel-to-world (RAS+, mm) affine.

    Returns
    -------
    (x, y, z) : floats, mm
        The sizes of the stored axes closest to left-right, posterior-anterior and
        inferior-superior (nibabel's ``io_orientation``): ``z`` is the axial slice thickness,
        ``x`` and ``y`` the axial in-plane sizes.
    """
    sizes = nib.affines.voxel_sizes(np.asarray(affine))[:3]
    out = [0.0, 0.0, 0.0]
    for i, (j, _flip) in enumerate(nib.orientations.io_orientation(np.asarray(affine))):
        out[int(j)] = float(sizes[i])
    return tuple(out)


def pixdim_disagrees(img: nib.spatialimages.SpatialImage) -> tuple[bool, np.ndarray, np.ndarray]:
    """Whether a header's pixdim disagrees with the voxel sizes of the image's affine.

    Parameters
    ----------
    img : nibabel image, 3D

    Returns
    -------
    (disagrees, pixdim, affine_sizes)
        True where any size differs by more than 0.1 % (and 1e-4 mm); both as ndarray (3,)
        float, mm, along the stored axes.
    """
    pixdim = np.asarray(img.header.get_zooms()[:3], float)
    sizes = nib.affines.voxel_sizes(np.asarray(img.affine))[:3]
    return not np.allclose(pixdim, sizes, rtol=1e-3, atol=1e-4), pixdim, sizes


def fill_holes_per_slice(mask: np.ndarray, axis: int = 2) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` of each 2D slice across ``axis``, in place.

    Parameters
    ----------
    mask : ndarray (I, J, K) bool
    axis : int
        The axis the slices are taken across: :func:`inferior_superior_axis` of the image's
        affine for axial slices, so that the result does not depend on the storage order.

    Returns
    -------
    ndarray (I, J, K) bool, ``mask`` itself
    """
    for k in range(mask.shape[axis]):
        sl = (slice(None),) * axis + (k,)
        mask[sl] = ndimage.binary_fill_holes(mask[sl])
    return mask


def head_mask(data: np.ndarray, axis: int = 2) -> np.ndarray:
    """Foreground (head) mask: Otsu threshold, largest component, holes filled per slice.

    Parameters
    ----------
    data : ndarray (X, Y, Z)
        Image intensities.
    axis : int
        Holes are filled in the slices across this axis (:func:`fill_holes_per_slice`; 2 for
        arrays already in axial RAS+ order).

    Returns
    -------
    ndarray (X, Y, Z) bool
    """
    mask = data > head_threshold(data)
    labels, n = ndimage.label(mask)
    if n > 1:
        # component sizes without float64/int64 copies of the whole volume (ndimage.sum
        # would make 1.3 GB of them for a 512x512x300 scan); the sizes are the same
        from ..distance import label_counts

        sizes = label_counts(labels, n + 1)
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    del labels
    return fill_holes_per_slice(mask, axis)


@dataclass(frozen=True)
class SliceGeometry:
    """How one 3D image maps to the model's slice stack and back.

    Attributes
    ----------
    in_shape : tuple of 3 int
        Shape of the input voxel array, as stored.
    ornt : tuple of 3 (axis, flip) pairs
        nibabel orientation taking the stored array to the closest RAS+ order.
    ras_shape : tuple of 3 int
        Shape ``(X, Y, Z)`` after reorientation.
    ras_zooms : tuple of 3 float
        Voxel size in mm along the reoriented axes.
    pixel_size : float
        Model pixel size in mm (square pixels).
    size : int
        Model slice size in pixels (square).
    centre : tuple of 2 float
        In-plane voxel coordinates (reoriented X, Y) placed at the slice centre.
    """

    in_shape: tuple
    ornt: tuple
    ras_shape: tuple
    ras_zooms: tuple
    pixel_size: float
    size: int
    centre: tuple

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_image(
        cls,
        img: nib.spatialimages.SpatialImage,
        pixel_size: float,
        size: int,
        centre_on: np.ndarray | None = None,
    ) -> "SliceGeometry":
        """Build the geometry of an image.

        Parameters
        ----------
        img : nibabel image, 3D
            Input image with a valid affine.
        pixel_size : float
            Model pixel size, mm.
        size : int
            Model slice size, pixels.
        centre_on : ndarray (X, Y, Z) of bool in the *stored* order, optional
            Mask whose in-plane bounding-box centre is put at the slice centre
            (default: the head mask of the image; array centre if empty).

        Raises
        ------
        InputDataError
            If the image is not 3D or its affine is singular.
        """
        shape = tuple(int(s) for s in img.shape)
        if len(shape) != 3:
            raise InputDataError(f"expected a 3D image, got shape {shape}")
        affine = np.asarray(img.affine, dtype=np.float64)
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise InputDataError("the image affine is singular or not finite")
        ornt = nib.orientations.io_orientation(affine)
        ras_list = [0, 0, 0]
        for i, (j, _flip) in enumerate(ornt):  # stored axis i becomes RAS axis j
            ras_list[int(j)] = shape[i]
        ras_shape = tuple(ras_list)
        ras_zooms = axial_voxel_sizes(affine)
        if centre_on is None:
            data = np.asarray(img.dataobj, dtype=np.float32)
            centre_on = head_mask(np.nan_to_num(data), axis=inferior_superior_axis(affine))
        mask_ras = nib.orientations.apply_orientation(np.asarray(centre_on), ornt)
        if mask_ras.any():
            ii, jj = np.nonzero(mask_ras.any(axis=2))
            centre = (0.5 * (ii.min() + ii.max()), 0.5 * (jj.min() + jj.max()))
        else:
            centre = ((ras_shape[0] - 1) / 2.0, (ras_shape[1] - 1) / 2.0)
        return cls(
            in_shape=shape,
            ornt=tuple((int(a), int(f)) for a, f in ornt),
            ras_shape=ras_shape,
            ras_zooms=ras_zooms,
            pixel_size=float(pixel_size),
            size=int(size),
            centre=(float(centre[0]), float(centre[1])),
        )

    # ---------------------------------------------------------------- maps
    def _inplane(self) -> tuple[np.ndarray, np.ndarray]:
        """Diagonal scale and offset mapping slice pixel (u, v) to voxel (i, j)."""
        scale = np.array([self.pixel_size / self.ras_zooms[0], self.pixel_size / self.ras_zooms[1]])
        c_out = (self.size - 1) / 2.0
        # Offsets are snapped to whole input voxels: at unit scale the map is then
        # an exact integer shift, so nearest-neighbour round trips are lossless.
        offset = np.round(np.array(self.centre) - c_out * scale)
        return scale, offset

    def to_ras(self, data: np.ndarray) -> np.ndarray:
        """Reorient a stored-order array ``(I, J, K[, C])`` to ``(X, Y, Z[, C])`` RAS+."""
        return nib.orientations.apply_orientation(data, np.array(self.ornt, dtype=float))

    def from_ras(self, data: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_ras`."""
        back = _invert_ornt(np.array(self.ornt, dtype=float))
        return nib.orientations.apply_orientation(data, back)

    def slice_boxes(self, mask: np.ndarray) -> np.ndarray:
        """Per model slice, the in-plane pixel box that a stored-order mask's voxels touch.

        A pixel is in the box when the linear interpolation of :meth:`forward` reads a voxel
        of the mask into it, or :meth:`inverse` reads it back into a voxel of the mask
        (pixels within one input voxel of the mask's bounding box, mapped by the in-plane
        scale and offset), so probabilities outside the boxes never reach the mask. Model
        slices are the RAS+ axial slices of the input, not resampled along Z: a slice
        without mask voxels has an empty box.

        Parameters
        ----------
        mask : ndarray (I, J, K) bool, stored order

        Returns
        -------
        ndarray (Z, 4) int64
            ``[row0, row1, col0, col1)`` per model slice (rows along +x, columns along +y
            of the RAS+ image, as in :meth:`forward`), within ``[0, size]``; ``row0 == row1``
            for a slice without mask voxels.
        """
        if tuple(mask.shape) != self.in_shape:
            raise ValueError(f"mask shape {mask.shape} != geometry shape {self.in_shape}")
        voxels = per_slice_boxes(np.moveaxis(self.to_ras(np.asarray(mask, bool)), 2, 0))
        held = voxels[:, 0] < voxels[:, 1]
        boxes = np.zeros_like(voxels)
        scale, offset = self._inplane()
        for axis, col in ((0, 0), (1, 2)):
            first, last = voxels[:, col], voxels[:, col + 1] - 1
            # voxel i is read by pixels u with |scale * u + offset - i| < 1
            lo = np.floor((first - 1 - offset[axis]) / scale[axis]).astype(np.int64)
            hi = np.ceil((last + 1 - offset[axis]) / scale[axis]).astype(np.int64) + 1
            boxes[:, col] = np.where(held, np.clip(lo, 0, self.size), 0)
            boxes[:, col + 1] = np.where(held, np.clip(hi, 0, self.size), 0)
        empty = (boxes[:, 0] >= boxes[:, 1]) | (boxes[:, 2] >= boxes[:, 3])
        boxes[empty] = 0
        return boxes

    def forward(self, data: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
        """Stored-order volume -> model slices.

        Parameters
        ----------
        data : ndarray (I, J, K), stored order
            Intensities (``order=1``) or labels (``order=0``).
        order : int
            Spline order of the in-plane interpolation (0 nearest, 1 linear).
        cval : float
            Value outside the input field of view.

        Returns
        -------
        ndarray (Z, size, size) float32 (or the input dtype for ``order=0``)
        """
        if tuple(data.shape) != self.in_shape:
            raise ValueError(f"array shape {data.shape} != geometry shape {self.in_shape}")
        ras = self.to_ras(np.asarray(data))
        scale, offset = self._inplane()
        out_dtype = ras.dtype if order == 0 else np.float32
        shape = (self.size, self.size, self.ras_shape[2])
        if order in (0, 1) and _unit(scale):  # a spline of higher order would prefilter
            out = _shifted(ras, offset, shape, cval, out_dtype)
        else:
            src = ras if order == 0 else ras.astype(np.float32, copy=False)
            out = ndimage.affine_transform(
                src,
                np.array([scale[0], scale[1], 1.0]),
                offset=np.array([offset[0], offset[1], 0.0]),
                output_shape=shape,
                order=order,
                mode="constant",
                cval=cval,
                output=out_dtype,
            )
        return np.ascontiguousarray(np.moveaxis(out, 2, 0))

    def inverse(self, slices: np.ndarray, order: int = 1, cval=0.0, dtype=np.float32,
                box: tuple | None = None, crop: bool = False) -> np.ndarray:
        """Model slices -> stored-order volume on the input voxel grid.

        Parameters
        ----------
        slices : ndarray (Z, size, size) or (Z, size, size, C)
            Per-slice values, e.g. per-class probabilities (C channels).
        order : {0, 1}
            Spline order (1 for probabilities, 0 for labels).
        cval : float or sequence of C floats
            Value outside the model field of view, per channel (e.g. 1 for the
            background probability, 0 for the others).
        dtype : numpy dtype
            Of the output (float16 halves the memory of a large probability volume).
        box : tuple of 3 slices, stored order, optional
            Only voxels in this box are interpolated; the others get ``cval`` (e.g. the brain
            mask's ``distance.bounding_box``, for probabilities that are background outside
            the brain anyway: the brain's box is a fraction of a head scan's field of view).
        crop : bool
            With ``box``: return only the box, the voxels outside it being ``cval`` anyway
            (0.30 of the memory of the synthetic 512x512x300 head's probabilities).

        Returns
        -------
        ndarray (I, J, K) or (I, J, K, C) of ``dtype`` (float32 default), in the stored voxel order;
        with ``crop``, (I', J', K'[, C]), the box (zero-sized when it is empty)
        """
        if order not in (0, 1):
            # higher orders pre-filter along the slice axis: chunks of slices would not be exact
            raise ValueError(f"inverse interpolates with order 0 or 1, got {order}")
        squeeze = slices.ndim == 3
        if squeeze:
            slices = slices[..., None]
        nz, h, w, nc = slices.shape
        if (nz, h, w) != (self.ras_shape[2], self.size, self.size):
            raise ValueError(f"slices {slices.shape} do not match geometry {self}")
        cvals = np.broadcast_to(np.asarray(cval, dtype=np.float32), (nc,))
        scale, offset = self._inplane()
        inv_scale = 1.0 / scale
        inv_offset = -offset / scale
        matrix = np.array([inv_scale[0], inv_scale[1], 1.0])
        # the stored-order region to interpolate, the same in RAS+, and the output's region
        whole = tuple(slice(0, n) for n in self.in_shape)
        region = whole if box is None else tuple(slice(int(b.start), int(b.stop)) for b in box)
        # stored order -> RAS+ is the inverse orientation's "RAS+ -> stored order"
        box = _box_in_stored_order(_invert_ornt(np.asarray(self.ornt)), self.ras_shape, region)
        origin = region if crop else whole
        # output voxel o of the box is voxel o + start of the grid: shift the in-plane offset
        offset = np.array([inv_offset[0] + inv_scale[0] * box[0].start, inv_offset[1] + inv_scale[1] * box[1].start,
                           0.0])
        # one channel and INVERSE_CHUNK_SLICES slices at a time, interpolated and written straight
        # into the stored-order output: beyond the output, memory holds one chunk (float32), not a
        # box-sized channel and its float32 copy (0.25 GB for a 512x512x300 scan). Exact: the
        # slice axis maps to itself (matrix entry 1, integer coordinates), so slice z of the
        # output reads model slice z only.
        out = np.empty(tuple(r.stop - r.start for r in origin) + (nc,), dtype=dtype)
        vol = np.moveaxis(slices, 0, 2)  # (size, size, Z, C)
        unit = _unit(inv_scale)
        for c in range(nc):
            out[..., c] = cvals[c]
            for z0 in range(box[2].start, box[2].stop, INVERSE_CHUNK_SLICES):
                z1 = min(z0 + INVERSE_CHUNK_SLICES, box[2].stop)
                chunk_shape = (box[0].stop - box[0].start, box[1].stop - box[1].start, z1 - z0)
                if unit:
                    ras = _shifted(vol[:, :, z0:z1, c], offset, chunk_shape, float(cvals[c]), np.float32)
                else:
                    ras = ndimage.affine_transform(
                        vol[:, :, z0:z1, c].astype(np.float32),
                        matrix,
                        offset=offset,
                        output_shape=chunk_shape,
                        output=np.float32,
                        order=order,
                        mode="constant",
                        cval=float(cvals[c]),
                    )
                chunk = _box_in_stored_order(self.ornt, self.in_shape, (box[0], box[1], slice(z0, z1)))
                chunk = tuple(slice(a.start - r.start, a.stop - r.start) for a, r in zip(chunk, origin))
                out[chunk + (c,)] = self.from_ras(ras)
                del ras
        return out[..., 0] if squeeze else out


def per_slice_boxes(mask: np.ndarray) -> np.ndarray:
    """The bounding box of each slice of a mask, in its own index space.

    Parameters
    ----------
    mask : ndarray (Z, A, B) bool

    Returns
    -------
    ndarray (Z, 4) int64, ``[a0, a1, b0, b1)`` per slice; zeros for a slice without True voxels
    """
    boxes = np.zeros((mask.shape[0], 4), np.int64)
    for axis, col in ((2, 0), (1, 2)):
        along = mask.any(axis=axis)  # (Z, A) rows holding mask, then (Z, B) columns
        held = along.any(axis=1)
        boxes[:, col] = np.where(held, np.argmax(along, axis=1), 0)
        boxes[:, col + 1] = np.where(held, along.shape[1] - np.argmax(along[:, ::-1], axis=1), 0)
    return boxes


def _unit(scale) -> bool:
    """Whether an in-plane map has unit scale (model pixel = input voxel): its offsets are
    whole voxels (:meth:`SliceGeometry._inplane`), so it is an integer shift."""
    return bool(np.all(np.asarray(scale) == 1.0))


def _shifted(src: np.ndarray, offset, shape: tuple, cval: float, dtype) -> np.ndarray:
    """``out[u, v, ...] = src[u + offset[0], v + offset[1], ...]``, ``cval`` outside ``src``.

    What ``ndimage.affine_transform`` computes for a unit-scale map with whole-voxel offsets
    with order 0 or 1 (interpolation at integer coordinates returns the voxel itself; inputs
    are finite), as a copy of the overlap instead of an interpolation per output voxel: on a
    1 mm 182x218x182 scan slicing took 0.54 s instead of 0.88 s, mapping 5 channels back
    0.35 s instead of 1.14 s (2026-12-02).

    Parameters
    ----------
    src : ndarray (X, Y, ...)
    offset : 2 whole numbers (float or int), the input voxel of output pixel (0, 0)
    shape : tuple, output shape (U, V, ...) with the trailing axes of ``src``
    cval : float, value outside ``src``
    dtype : output dtype
    """
    out = np.full(shape, cval, dtype=dtype)
    dst, srcs = [], []
    for d in range(2):
        o, n_in, n_out = int(round(float(offset[d]))), src.shape[d], shape[d]
        lo, hi = max(0, -o), min(n_out, n_in - o)
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        srcs.append(slice(lo + o, hi + o))
    out[dst[0], dst[1]] = src[srcs[0], srcs[1]]
    return out


def _box_in_stored_order(ornt, in_shape, box) -> tuple:
    """The stored-order slices of the voxels that a RAS+ box ``box`` holds.

    ``ornt[i] = (j, flip)``: stored axis ``i`` is RAS+ axis ``j``, reversed when ``flip`` is -1.
    """
    out = []
    for i, (j, flip) in enumerate(ornt):
        b, n = box[int(j)], int(in_shape[i])
        out.append(slice(n - b.stop, n - b.start) if flip < 0 else slice(b.start, b.stop))
    return tuple(out)


def _invert_ornt(ornt: np.ndarray) -> np.ndarray:
    """Orientation that undoes ``apply_orientation(arr, ornt)``.

    ``ornt[i] = (j, flip)`` sends input axis ``i`` to output axis ``j``. The inverse
    sends output axis ``j`` back to ``i`` with the same flip.
    """
    inv = np.zeros_like(ornt)
    for i, (j, flip) in enumerate(ornt):
        inv[int(j)] = (i, flip)
    return inv
