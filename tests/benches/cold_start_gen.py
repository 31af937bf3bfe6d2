#!/usr/bin/env python3
"""The warm bench's generator: a configurable cold start, then per round a fixed amount of
work and a small .npy of B float32 rows derived from the seed alone.

    cold_start_gen.py --cold_ms 2000 --work_ms 200 [--seed S --batch_size B --output P]

Process mode: the flags name the round. Warm mode (QUARRY_REPLY_FD set): the cold start is
paid once, then each round comes from quarry_generator's serve loop. Each round appends
`<work start> <work end>` (monotonic-free wall seconds) to $BENCH_SPANS, so that the bench
can tell the time spent inside rounds from the wall time.
"""

import argparse
import os
import struct
import sys
import time


def cold_start(ms):
    time.sleep(ms / 1000.0)


def write_round(path, seed, batch, work_ms):
    start = time.time()
    time.sleep(work_ms / 1000.0)
    rows = [float((seed * 2654435761 + i) % 1000003) for i in range(batch)]
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d,), }" % batch
    raw = header.encode("latin1")
    pad = 64 - ((10 + len(raw) + 1) % 64)
    data = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw) + pad + 1) + raw + b" " * pad + b"\n"
    data += struct.pack("<%df" % batch, *rows)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    end = time.time()
    spans = os.environ.get("BENCH_SPANS")
    if spans:
        with open(spans, "a") as f:
            f.write(f"{start} {end}\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cold_ms", type=int, default=2000)
    p.add_argument("--work_ms", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    cold_start(args.cold_ms)
    if os.environ.get("QUARRY_REPLY_FD"):
        from quarry_generator import serve

        return serve(lambda r: write_round(r.output, r.seed, r.batch_size, args.work_ms))
    write_round(args.output, args.seed, args.batch_size, args.work_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
