#!/usr/bin/env python3
"""Writes the largest images the `image` fuzz target's entry point accepts, as inputs of that target
(a settings byte, then the file), to time them: the per-input time limit of the `image` and `parquet`
campaigns is set from these (docs/RELIABILITY.md, "Fuzzing"). Usage: largest_images.py OUT_DIR

* `decode-max`: a PNG of 13,377 x 13,377 pixels (178.9 million, just under PIL's limit of
  178,956,970 that the data crate shares), decoded, then resized down to 32 px;
* `upscale-max`: a PNG of 5,592,000 x 1 pixels, resized up to cover 32 px (178.9 million pixels),
  then cropped; the largest resize the data crate allows (transform::MAX_PIXELS).

Settings byte 0: square 32 px target, centre crop, no flip, upscaling allowed
(fuzz/src/targets/datasets.rs, `image`). Plain Python: zlib, struct.
"""
import os
import struct
import sys
import zlib


def png(width, height):
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * (3 * width)  # filter 0, mid grey
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, (width, height) in {"decode-max": (13_377, 13_377),
                                  "upscale-max": (5_592_000, 1)}.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(bytes([0]) + png(width, height))


if __name__ == "__main__":
    main()
