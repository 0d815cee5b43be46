"""Metadata: the orientation applied, what ``keepMetadata`` and ``keepProfile`` keep of a source (EXIF, XMP,
its RGB profile), everything else dropped, and how each format writes what is kept."""
from __future__ import annotations

from PIL import ExifTags, Image, ImageOps, PngImagePlugin

_COPYRIGHT_TAGS = (ExifTags.Base.Copyright, ExifTags.Base.Artist)


def orient(im: Image.Image) -> Image.Image:
    try:
        oriented = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block must not lose the image
        return im
    if oriented is not im:
        oriented.info.setdefault("icc_profile", im.info.get("icc_profile"))
    return oriented if oriented is not None else im


def kept_metadata(im: Image.Image, level: str) -> tuple[bytes | None, bytes | None]:
    """The EXIF and XMP that ``keepMetadata`` keeps, read from an oriented image: none; copyright (EXIF
    Copyright and Artist only, no XMP); all (the EXIF with its orientation set to 1, since the pixels are
    turned already, GPS included, and the XMP). A block that cannot be read is dropped, never fatal."""
    if level not in ("copyright", "all"):
        return None, None
    try:
        exif = im.getexif()
    except Exception:  # a broken EXIF block: nothing of it is kept
        exif = Image.Exif()
    if level == "copyright":
        kept = Image.Exif()
        for tag in _COPYRIGHT_TAGS:
            if exif.get(tag):
                kept[tag] = exif[tag]
        return (kept.tobytes() if len(kept) else None), None
    try:
        if len(exif):
            for ifd in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo):
                if ifd in exif:
                    exif.get_ifd(ifd)  # loaded, so tobytes writes the sub-IFD again
            exif[ExifTags.Base.Orientation] = 1
            raw_exif = exif.tobytes()
        else:
            raw_exif = None
    except Exception:
        raw_exif = None
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return raw_exif, (xmp if isinstance(xmp, bytes) and xmp else None)


def kept_profile(im: Image.Image, keep: bool) -> bytes | None:
    """The source's ICC profile when ``keepProfile`` asks for it and it can describe the output: an RGB
    profile on an RGB(A) (or palette) source. A CMYK or grey profile is never embedded in an RGB output:
    those sources are converted to sRGB as without the option."""
    icc = im.info.get("icc_profile")
    if not keep or not icc or len(icc) < 128 or icc[16:20] != b"RGB ":
        return None
    return icc if im.mode in ("RGB", "RGBA", "RGBX", "P", "PA") else None


def strip_metadata(im: Image.Image) -> Image.Image:
    """Drop what Pillow carries from the source (EXIF with GPS, XMP, IPTC, comments, text chunks,
    the profile): writers pick some of it up from ``info`` unasked. Orientation is applied already."""
    im.info = {}
    return im


def metadata_params(pil_format: str, exif: bytes | None, xmp: bytes | None) -> dict:
    """Save parameters that write the kept EXIF and XMP in each format."""
    if pil_format == "JPEG":  # one APP1 segment each: what does not fit one is not kept
        return {k: v for k, v, room in (("exif", exif, _JPEG_EXIF_ROOM), ("xmp", xmp, _JPEG_XMP_ROOM))
                if v and len(v) <= room}
    if pil_format == "PNG":
        params: dict = {"exif": exif} if exif else {}
        if xmp:
            info = PngImagePlugin.PngInfo()
            info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"))
            params["pnginfo"] = info
        return params
    if pil_format == "TIFF":
        tags = {}
        if exif:
            kept = Image.Exif()
            kept.load(exif)
            tags = {tag: value for tag, value in kept.items() if isinstance(value, str) and tag in _TIFF_TEXT_TAGS}
        if xmp:
            tags[700] = xmp
        return {"tiffinfo": tags} if tags else {}
    return {k: v for k, v in (("exif", exif), ("xmp", xmp)) if v}  # WebP, AVIF: save(exif=, xmp=)


# a JPEG marker segment holds 65533 bytes of data: EXIF after its 6-byte header, XMP after its 29-byte namespace
_JPEG_EXIF_ROOM = 65533 - 6


_JPEG_XMP_ROOM = 65533 - 29


# the text tags of a TIFF's first IFD that keepMetadata carries into a TIFF output
_TIFF_TEXT_TAGS = (ExifTags.Base.ImageDescription, ExifTags.Base.Make, ExifTags.Base.Model, ExifTags.Base.Software,
                   ExifTags.Base.DateTime, ExifTags.Base.Artist, ExifTags.Base.Copyright)
