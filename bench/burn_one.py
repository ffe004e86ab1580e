"""The xargs peer's per-file script: ``python burn_one.py OUTDIR FILE``, the work of ``burn``."""

import json
import os
import sys


def main() -> None:
    outdir, path = sys.argv[1], sys.argv[2]
    with open(path) as fh:
        loops = int(fh.read().split()[0])
    x = 0
    for i in range(loops):
        x = (x * 31 + i) & 0xFFFFFFFF
    out = os.path.join(
        outdir, os.path.basename(os.path.dirname(path)) + "-" + os.path.basename(path)
    )
    with open(out + ".json", "w") as fh:
        json.dump({"loops": loops, "x": x}, fh)


if __name__ == "__main__":
    main()
