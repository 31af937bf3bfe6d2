#!/usr/bin/env python3
"""Example JSON Lines generator for Quarry: one round of grasp trials as JSON Lines.

    python3 jsonl_gen.py --seed S --object NAME --batch_size N --out FILE.jsonl [--stats PATH]

It attempts N trials for object NAME; each succeeds with probability --success_rate and only
successes are written, one JSON object per line, so FILE holds S <= N lines:

    {"object": "mug", "seed": 3, "trial": 7, "energy": 0.41, "valid": true,
     "metrics": {"E_pen": 0.004, "E_dis": 0.05, "steps": 12},
     "pose": {"pos": [x, y, z], "quat": [w, x, y, z]}, "joints": [[...], [...]],
     "tags": ["grasp", "left"], "note": null}

Lines depend only on (--object, --seed) and the flags: the same command writes the same bytes.
`metrics.steps` takes few values, so de-duplicating on it drops lines. Standard library only.

  --stats PATH          write {"attempts": N, "successes": S} there
  --success_rate P      chance a trial succeeds (default 0.8)
  --no_final_newline    leave the last line without its "\\n"
  --crlf                end lines with "\\r\\n"
  --bad_line_seeds L    for these seeds, write line 2 as invalid JSON (comma separated)
  --fail_seeds L        print an error and exit 3 for these seeds

Exit codes: 0 success, 2 bad usage, 3 --fail_seeds.
"""

import argparse
import json
import os
import random
import sys


def seed_list(text):
    try:
        return frozenset(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma separated list of integers: {text!r}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--object", required=True)
    p.add_argument("--batch_size", type=int, required=True)
    p.add_argument("--out", required=True, help="JSON Lines file to write")
    p.add_argument("--stats", default=None)
    p.add_argument("--success_rate", type=float, default=0.8)
    p.add_argument("--no_final_newline", action="store_true")
    p.add_argument("--crlf", action="store_true")
    p.add_argument("--bad_line_seeds", type=seed_list, default=frozenset(), metavar="L")
    p.add_argument("--fail_seeds", type=seed_list, default=frozenset(), metavar="L")
    return p


def trial(rng, obj, seed, t):
    """One attempted trial's sample."""
    e_pen = round(rng.expovariate(50.0), 6)
    e_dis = round(rng.expovariate(20.0), 6)
    sample = {
        "object": obj,
        "seed": seed,
        "trial": t,
        "energy": round(e_dis + 100.0 * e_pen, 6),
        "valid": e_pen < 0.02,
        "metrics": {"E_pen": e_pen, "E_dis": e_dis, "steps": rng.randint(10, 14)},
        "pose": {"pos": [round(rng.uniform(-0.2, 0.2), 5) for _ in range(3)],
                 "quat": [round(rng.uniform(-1, 1), 5) for _ in range(4)]},
        "joints": [[round(rng.uniform(-1, 1), 4) for _ in range(3)] for _ in range(2)],
        "tags": ["grasp", rng.choice(["left", "right", "both"])],
        "note": None,
    }
    return sample


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 0:
        parser.error("--batch_size must be >= 0")
    if args.seed in args.fail_seeds:
        print(f"jsonl_gen: injected failure for seed {args.seed}", file=sys.stderr)
        return 3
    rng = random.Random(f"{args.object}:{args.seed}")
    lines = []
    for t in range(args.batch_size):
        sample = trial(rng, args.object, args.seed, t)
        if rng.random() < args.success_rate:
            lines.append(json.dumps(sample))
    if args.seed in args.bad_line_seeds and len(lines) >= 2:
        lines[1] = lines[1][:-5] + ', "x": }'
    end = "\r\n" if args.crlf else "\n"
    text = "".join(line + end for line in lines)
    if args.no_final_newline and text:
        text = text[: -len(end)]
    directory = os.path.dirname(args.out)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        f.write(text)
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump({"attempts": args.batch_size, "successes": len(lines)}, f)
    print(f"jsonl_gen: {args.object} seed {args.seed}: wrote {len(lines)}/{args.batch_size} "
          f"lines to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    if os.environ.get("QUARRY_REPLY_FD"):
        # Warm mode (generator.mode = "warm"): rounds come from the agent, through
        # deploy/python's quarry_generator (installed, or found beside this directory).
        sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from quarry_generator import serve_cli

        sys.exit(serve_cli(main))
    sys.exit(main())
