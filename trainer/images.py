"""Image decoding with safety limits: which formats, how many pixels, what counts as broken.

PIL only (no torch, no Beam): the annotate job checks images with it and the trainer decodes with it.
"""
import io
import warnings

from PIL import Image

# Decoders allowed on data from the web; PIL will not try any other plug-in on these bytes.
ALLOWED_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
# Decompression-bomb limit. PIL's own default (Image.MAX_IMAGE_PIXELS = 89,478,485, about
# 0.25 GB of RGB) is far above a web image; img2dataset resizes to 256-1024 px per side, so
# 64 megapixels is generous and still bounds one decoded image to about 200 MB.
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024


class ImageRejected(ValueError):
    """The bytes are not an image we accept; `reason` is a quarantine reason."""

    def __init__(self, reason, detail):
        super().__init__(detail)
        self.reason = reason


def decode_image(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, mode="RGB"):
    """Fully decodes image bytes into a PIL image in `mode`, checking the size before decoding."""
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
        raise ImageRejected("image_too_large",
                            f"{width}x{height} = {width * height} pixels, limit {max_pixels}")
    try:
        image.load()  # truncated or corrupt data fails here
        return image.convert(mode) if image.mode != mode else image
    except Exception as error:
        raise ImageRejected("undecodable_image", f"{image.format} data is broken: {error}") from None
