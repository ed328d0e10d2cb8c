"""Image decoding with safety limits: which formats, how many pixels, what counts as broken.

PIL only (no torch, no Beam): the annotate job checks images with it and the trainer decodes with
it.
"""
import io
import warnings

from PIL import Image

# Decoders allowed on data from the web; PIL will not try any other plug-in on these bytes.
ALLOWED_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
# The members (tar extensions) and files that hold an image: img2dataset writes these.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Decompression-bomb limit. PIL's own default (Image.MAX_IMAGE_PIXELS = 89,478,485, about
# 0.25 GB of RGB) is far above a web image; img2dataset resizes to 256-1024 px per side, so
# 64 megapixels is generous and still bounds one decoded image to about 200 MB.
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024


# How much of an image the annotate job checks (--validate-images), cheapest last:
#   full:   decode every pixel (truncated or corrupt data is caught);
#   draft:  JPEGs decoded at reduced scale by libjpeg's DCT scaling (most corruption caught, several
#           times cheaper); other formats fully;
#   header: only the header is parsed: non-images, formats outside the allow-list and bombs by their
#           declared size are still rejected, broken pixel data is not;
#   none:   the bytes are not looked at.
VALIDATION_LEVELS = ("full", "draft", "header", "none")
DRAFT_SIZE = (64, 64)


class ImageRejected(ValueError):
    """The bytes are not an image we accept; `reason` is a quarantine reason."""

    def __init__(self, reason, detail):
        super().__init__(detail)
        self.reason = reason


def check_image(data, level="full", max_pixels=DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Raise ImageRejected unless `data` passes the check of `level` (see VALIDATION_LEVELS)."""
    if level == "none":
        return
    if level == "full":
        decode_image(data, max_pixels)
        return
    image = open_image(data, max_pixels)
    if level == "header":
        return
    try:
        if image.format == "JPEG":
            image.draft("RGB", DRAFT_SIZE)
        image.load()
    except Exception as error:
        raise ImageRejected(
            "undecodable_image", f"{image.format} data is broken: {error}"
        ) from None


def open_image(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Parse the header only: an allowed format whose declared size is within `max_pixels`."""
    try:
        with warnings.catch_warnings():  # the size is checked below with our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageRejected("image_too_large", str(error)) from None
    except Exception as error:
        raise ImageRejected("undecodable_image", f"cannot identify image: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(
            "image_too_large", f"{width}x{height} = {width * height} pixels, limit {max_pixels}"
        )
    return image


def decode_image(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, mode="RGB"):
    """Fully decodes image bytes into a PIL image in `mode`, checking the size before decoding."""
    image = open_image(data, max_pixels)
    try:
        image.load()  # truncated or corrupt data fails here
        return image.convert(mode) if image.mode != mode else image
    except Exception as error:
        raise ImageRejected(
            "undecodable_image", f"{image.format} data is broken: {error}"
        ) from None
