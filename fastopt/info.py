"""``python -m fastopt.info``: what this install was built with, and what ``backend="auto"`` picks."""
import json
import sys

import torch

from . import _backend


def report():
    info = _backend.build_info()
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    info["auto"] = {d: _backend.resolve("auto", d, torch.float32) for d in devices}
    info["available"] = {d: _backend.available_backends(d) for d in devices}
    return info


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    info = report()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
