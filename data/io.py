"""Reading and writing microscopy images as 8-bit RGB arrays.

Every image enters the pipeline through :func:`read_image`, which returns an
``(H, W, 3)`` ``uint8`` array in RGB order whatever the file holds:

* **Bit depth** - integer images are scaled by the range of their *dtype*,
  e.g. 16-bit values are mapped with ``round(v * 255 / 65535)`` (so
  ``257 * k -> k`` and ``65535 -> 255``). Scaling by the per-image min/max
  would stretch the contrast of every image differently and destroy the
  absolute stain intensities the features rely on. Float images are assumed
  to hold values in ``[0, 1]`` (values outside are clipped).
* **Grayscale** images are replicated to three identical channels.
* **Alpha** is removed by compositing onto white: slide scanners and
  export tools use white for "no tissue", so transparent pixels then look
  like the glass background the models saw during training (compositing on
  black would create dark, nucleus-like regions).
* **Palette** images are expanded to their colours.
* Only the first page/frame of multi-page files is read, and EXIF
  orientation is ignored (pixels are returned as stored).

Decoding uses OpenCV; TIFF files that OpenCV cannot decode (e.g. some
compressions) or that carry an alpha channel are read with ``tifffile``,
which reports whether alpha is premultiplied. Any failure - missing, empty,
truncated or corrupt file, or an unsupported pixel layout - raises
:class:`ImageReadError` naming the file and the reason.
"""

from __future__ import annotations

import io as _io
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import tifffile

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "is_image_file",
    "read_image",
    "write_image",
]

#: Lower-case file extensions recognised as images (JPEG, PNG, TIFF).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff")

log = logging.getLogger(__name__)

# Little-endian, big-endian and BigTIFF signatures.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ImageReadError(ValueError):
    """An image file could not be read.

    Parameters
    ----------
    path : str or os.PathLike
        The file that failed.
    reason : str
        Human-readable cause, e.g. ``"file is empty (0 bytes)"``.

    Attributes
    ----------
    path : str
        The file that failed, as given.
    reason : str
        Human-readable cause.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image '{self.path}': {reason}")

    def __reduce__(self):
        # Default exception pickling would call cls(message) and fail; keep the
        # error transferable from joblib/multiprocessing workers.
        return (type(self), (self.path, self.reason))


def is_image_file(path: str | os.PathLike) -> bool:
    """Return whether `path` has one of :data:`IMAGE_EXTENSIONS` (any case).

    Parameters
    ----------
    path : str or os.PathLike
        File name or path; the file itself is not opened.

    Returns
    -------
    bool
    """
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files below `folder` (recursively), sorted; the one image listing of the package.

    Hidden entries are skipped: names starting with ``.`` or ``__`` anywhere below `folder`
    (macOS ``._x.jpg`` resource forks, ``__MACOSX``) are not data.
    A name that is not valid UTF-8 is skipped with a warning naming it: it cannot become an
    image id in a table or a store.
    """
    folder = Path(folder)
    found = []
    for p in folder.rglob("*"):
        if (not is_image_file(p) or any(part.startswith((".", "__")) for part in p.relative_to(folder).parts)
                or not p.is_file()):
            continue
        try:
            str(p).encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(p).decode("utf-8", "backslashreplace")
            log.warning("skipped %s: the file name is not valid UTF-8; rename the file", shown)
            continue
        found.append(p)
    return sorted(found)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an 8-bit RGB array.

    Parameters
    ----------
    path : str or os.PathLike
        JPEG, PNG or TIFF file (8 or 16 bit; gray, gray+alpha, RGB, RGBA or
        palette). See the module docstring for the conversion rules.

    Returns
    -------
    numpy.ndarray
        Array of shape ``(H, W, 3)``, dtype ``uint8``, RGB channel order.

    Raises
    ------
    ImageReadError
        If the file is missing, empty, truncated, corrupt, not an image, or
        has an unsupported pixel layout.
    """
    try:
        # Read the bytes ourselves: cv2.imread cannot open non-ASCII paths on
        # Windows and gives no reason when it fails.
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not a file") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot open file ({exc.strerror or exc})") from None
    if not data:
        raise ImageReadError(path, "file is empty (0 bytes)")

    raw, order, alpha_mode = _decode(data, path)
    return _to_rgb8(raw, order, alpha_mode, path)


def _decode(data: bytes, path) -> tuple[np.ndarray, str, str]:
    """Decode bytes to a raw array; return it with its channel order and alpha mode."""
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        img = None
    is_tiff = data[:4] in _TIFF_MAGIC
    has_alpha = img is not None and img.ndim == 3 and img.shape[2] in (2, 4)
    if not is_tiff:
        if img is None:
            raise ImageReadError(
                path,
                "not a decodable image (unknown format, or truncated/corrupt data); "
                f"supported: {', '.join(IMAGE_EXTENSIONS)}",
            )
        return img, "bgr", "straight"
    if img is not None and not has_alpha:
        return img, "bgr", "straight"
    # TIFF that OpenCV could not decode, or with alpha: OpenCV's libtiff path
    # premultiplies 8-bit unassociated alpha but not 16-bit, so ask tifffile,
    # which returns stored values plus the ExtraSamples semantics.
    try:
        return _decode_tifffile(data)
    except Exception as exc:  # tifffile raises many types for bad input
        if img is None:
            reason = str(exc) or type(exc).__name__
            raise ImageReadError(path, f"corrupt or unsupported TIFF ({reason})") from None
    # tifffile lacks a codec OpenCV has (e.g. JPEG/LZW without imagecodecs):
    # keep OpenCV's pixels; its 8-bit RGBA decoder yields premultiplied colour.
    return img, "bgr", "premultiplied" if img.dtype == np.uint8 else "straight"


def _decode_tifffile(data: bytes) -> tuple[np.ndarray, str, str]:
    """Decode the first page of a TIFF with tifffile (RGB order)."""
    with tifffile.TiffFile(_io.BytesIO(data)) as tif:
        page = tif.pages.first
        arr = page.asarray()
        photometric = int(page.photometric)
        extrasamples = tuple(int(e) for e in page.extrasamples)
        colormap = page.colormap
        if int(page.planarconfig) == int(tifffile.PLANARCONFIG.SEPARATE) and arr.ndim == 3:
            arr = np.moveaxis(arr, 0, -1)  # (S, H, W) -> (H, W, S)

    alpha = None
    alpha_mode = "straight"
    if extrasamples and arr.ndim == 3:
        n_colour = arr.shape[2] - len(extrasamples)
        if extrasamples[0] in (int(tifffile.EXTRASAMPLE.ASSOCALPHA), int(tifffile.EXTRASAMPLE.UNASSALPHA)):
            alpha = arr[..., n_colour]
            if extrasamples[0] == int(tifffile.EXTRASAMPLE.ASSOCALPHA):
                alpha_mode = "premultiplied"
        arr = arr[..., :n_colour]  # "unspecified" extra samples are not alpha: drop

    if photometric == int(tifffile.PHOTOMETRIC.PALETTE):
        if colormap is None or arr.ndim != 2:
            raise ValueError("malformed palette image")
        # The colour map is (3, N) 16-bit: index it and keep 16-bit values.
        arr = np.moveaxis(np.asarray(colormap)[:, arr], 0, -1)
    elif photometric == int(tifffile.PHOTOMETRIC.MINISWHITE):
        arr = _invert(arr)
    elif photometric not in (int(tifffile.PHOTOMETRIC.MINISBLACK), int(tifffile.PHOTOMETRIC.RGB)):
        raise ValueError(f"photometric interpretation {photometric} is not supported")

    if alpha is not None:
        if arr.ndim == 2:
            arr = arr[..., None]
        arr = np.concatenate([arr, alpha[..., None].astype(arr.dtype)], axis=2)
    return arr, "rgb", alpha_mode


def _invert(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        return ~arr
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        return np.iinfo(arr.dtype).max - arr
    return 1.0 - arr


def _to_uint8(arr: np.ndarray, path) -> np.ndarray:
    """Scale an array to uint8 by the range of its dtype (not its values)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype == np.uint16:
        # Exact integer rounding of v * 255 / 65535, i.e. round(v / 257).
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        scale = 255.0 / np.iinfo(arr.dtype).max
        return np.rint(arr * scale).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        return np.rint(np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ImageReadError(path, f"unsupported pixel type {arr.dtype}")


def _to_rgb8(arr: np.ndarray, order: str, alpha_mode: str, path) -> np.ndarray:
    """Convert a decoded array (gray/colour, optional alpha) to RGB uint8."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)):
        raise ImageReadError(path, f"unsupported pixel layout with shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(path, f"image has zero size {arr.shape[:2]}")
    arr = _to_uint8(arr, path)

    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    n = arr.shape[2]
    colour = arr[..., :1] if n == 2 else arr[..., :3]
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    elif order == "bgr":
        colour = colour[..., ::-1]
    if n in (2, 4):
        colour = _composite_on_white(colour, arr[..., -1], alpha_mode)
    return np.ascontiguousarray(colour)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray, alpha_mode: str) -> np.ndarray:
    """Blend colour over a white background using an 8-bit alpha channel."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    c = rgb.astype(np.float32)
    if alpha_mode == "premultiplied":
        out = c + 255.0 * (1.0 - a)
    else:
        out = c * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_image(path: str | os.PathLike, rgb: np.ndarray, *, jpeg_quality: int = 95) -> Path:
    """Write an RGB (or grayscale) array to an image file.

    The format follows the extension (one of :data:`IMAGE_EXTENSIONS`).
    Parent directories are created when missing.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    rgb : numpy.ndarray
        ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA or ``(H, W)`` gray array of
        dtype ``uint8`` or ``uint16`` (16 bit only for PNG and TIFF).
    jpeg_quality : int, optional
        JPEG quality 0-100, used only for ``.jpg``/``.jpeg`` files.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    ValueError
        For an unsupported extension, array shape or dtype.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"cannot write '{path}': extension must be one of {IMAGE_EXTENSIONS}")
    arr = np.asarray(rgb)
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"cannot write '{path}': dtype must be uint8 or uint16, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    elif arr.ndim != 2:
        raise ValueError(f"cannot write '{path}': expected (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if ext in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(ext, arr, params)
    if not ok:
        raise ValueError(f"cannot write '{path}': OpenCV could not encode {arr.dtype} {arr.shape} as {ext}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # imencode + write_bytes instead of imwrite: works with non-ASCII paths.
    path.write_bytes(encoded.tobytes())
    return path
