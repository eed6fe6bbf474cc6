"""`fastbert serve` with every forward slowed down, for the drain test.

Usage: python _slow_server.py DELAY_SECONDS MODEL_DIR [serve options...]
"""
import sys
import time

from fastbert.cli import main
from fastbert.serve.engine import Engine

_forward = Engine.forward


def _slow_forward(self, batch):
    time.sleep(float(sys.argv[1]))
    return _forward(self, batch)


if __name__ == "__main__":
    Engine.forward = _slow_forward
    sys.exit(main(["serve", *sys.argv[2:]]))
