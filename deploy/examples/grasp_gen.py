#!/usr/bin/env python3
"""Example grasp generator for Quarry: a drop-in for the legacy grasp optimizer's CLI.

    python3 grasp_gen.py --name N --object_code O --batch_size B \\
        --num_iterations I --seed S --gpu G [extra flags]

It writes B grasp samples for object O to

    <out_root>/<N>/results/<O>.npy

where <out_root> defaults to ../data/experiments relative to the working directory: the
legacy layout, in which the optimizer runs with cwd <root>/BimanGrasp-Optimization and its
results land in <root>/data/experiments/<N>/results/<O>.npy. --out_root overrides it.

Pure Python 3 standard library; numpy is not needed to write the files but loads them:

  * --format object (default): what `np.save(path, list_of_dicts, allow_pickle=True)` writes
    with numpy 1.x: an .npy v1.0 header for a '|O' array of shape (B,) followed by a
    protocol-3 pickle of the object ndarray. Each sample is a dict
    {'object_code', 'scale', 'qpos_left': {joint: float}, 'qpos_right': {joint: float},
     'energy', 'E_pen', 'E_dis', 'valid', 'note', 'seed', 'index'}.
  * --format f32: a numeric '<f4' array of shape (B, 8), one row per sample
    (index, scale, energy, E_pen, E_dis, valid, qpos_left WRJTx, qpos_right WRJTx).

Samples depend only on (seed, object_code): the same flags always give the same bytes, and a
run that writes fewer samples writes a prefix of the full batch. --num_iterations only sets
how many rounds of cheap arithmetic run (progress is printed as they go); --work_ms spreads
that much sleep over them. Results are written atomically (temp file + rename) unless a
fault flag asks for a truncated file.

Fault and yield flags, for tests. A seed list is comma separated, e.g. --fail_seeds 3,17.
Faults are checked in this order: fail, flaky, hang, then the run works and sleeps, then
empty, and the write is dtype- or truncate-faulted.

  --yield_mode uneven   write max(1, B - (seed % 5) * max(1, B // 10)) samples instead of B
  --fail_seeds L        print an error to stderr and exit 3
  --flaky_seeds L       with --state_dir D: exit 4 the first time a (object, seed) pair is
                        seen (a marker file in D records it), succeed afterwards
  --hang_seeds L        print progress, then sleep forever (for timeout tests)
  --empty_seeds L       exit 0 without writing anything
  --truncate_seeds L    exit 0 after writing a file cut in the middle of its data
                        (written in place, not atomically, as a crash would leave it)
  --dtype_seeds L       write a numeric '<f8' array of shape (n, 8) instead (schema mismatch)
  --sleep_ms N          sleep N ms before writing (simulated GPU work)
  --stats_file P        write the yield sidecar {"attempts": B, "successes": n} to P

  --sigkill_seeds L     with --state_dir D: SIGKILL itself mid-round the first time an
                        (object, seed) pair is seen (a crash), succeed afterwards
  --hold_mb N           keep N MiB more in memory for every round this process serves (a
                        leak, for generator.recycle_above_memory_mib)

Warm mode: started by a Quarry agent with generator.mode = "warm" (QUARRY_REPLY_FD set), it
serves rounds through the quarry_generator package (deploy/python): each round runs main()
with the flags it was started with plus the round's --name, --object_code, --seed,
--batch_size, --num_iterations, --output and --stats_file, so both modes write the same bytes.

Unknown flags (the legacy optimizer's tuning knobs) are accepted and ignored.
Exit codes: 0 success (or a requested empty/truncated result), 2 bad usage, 3 --fail_seeds,
4 --flaky_seeds (first attempt).
"""

import argparse
import array
import os
import pickle
import random
import re
import struct
import sys
import time

# Joints of each hand's qpos: wrist translation/rotation and a few finger joints.
JOINTS = (
    "WRJTx", "WRJTy", "WRJTz", "WRJRx", "WRJRy", "WRJRz",
    "FFJ4", "FFJ3", "FFJ2", "FFJ1", "MFJ3", "THJ5",
)
SCALES = (0.06, 0.08, 0.1, 0.12, 0.15)
NUMERIC_COLS = 8
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")

# .npy format constants, as numpy writes them.
NPY_MAGIC = b"\x93NUMPY\x01\x00"
NPY_ALIGN = 64
NPY_GROWTH_AXIS_MAX_DIGITS = 21


def log(msg):
    print(f"[grasp_gen] {msg}", flush=True)


def seed_list(text):
    """Parses a comma separated list of seeds."""
    try:
        return frozenset(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma separated list of integers: {text!r}")


def name_arg(text):
    if not NAME_RE.match(text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} must match [A-Za-z0-9._-]+")
    return text


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # Exact names only: an abbreviation could swallow a legacy flag meant to be ignored.
        allow_abbrev=False,
    )
    p.add_argument("--name", required=True, type=name_arg, help="experiment name")
    p.add_argument("--object_code", required=True, type=name_arg, help="object to grasp")
    p.add_argument("--batch_size", type=int, default=16, help="samples per run (default 16)")
    p.add_argument("--num_iterations", type=int, default=100,
                   help="optimizer iterations: rounds of cheap arithmetic (default 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--gpu", default="0", help="GPU id, only printed (default 0)")
    p.add_argument("--out_root", default=None,
                   help="results root (default ../data/experiments relative to the cwd)")
    p.add_argument("--format", choices=("object", "f32"), default="object",
                   help="object: pickled list of dicts (default); f32: <f4 array (B, 8)")
    p.add_argument("--work_ms", type=int, default=0,
                   help="total sleep spread over the iterations (default 0)")
    p.add_argument("--sleep_ms", type=int, default=0, help="sleep before writing (default 0)")
    p.add_argument("--yield_mode", choices=("full", "uneven"), default="full",
                   help="full: B samples; uneven: fewer, depending on the seed")
    p.add_argument("--state_dir", default=None, help="marker directory for --flaky_seeds")
    p.add_argument("--hold_mb", type=int, default=0,
                   help="keep this many MiB more per round served (a stand-in leak)")
    p.add_argument("--output", default=None,
                   help="write the results exactly here (default <out_root>/<name>/results/<object>.npy)")
    p.add_argument("--stats_file", default=None,
                   help="also write the round's yield sidecar here: {\"attempts\": B, "
                        "\"successes\": samples written} (Quarry's generator.stats)"),
    for flag, what in (
        ("fail", "exit 3"),
        ("flaky", "exit 4 on the first attempt (needs --state_dir)"),
        ("hang", "sleep forever"),
        ("empty", "exit 0 writing nothing"),
        ("truncate", "write a truncated file"),
        ("dtype", "write a '<f8' array instead"),
        ("sigkill", "SIGKILL itself mid-round on the first attempt (needs --state_dir)"),
    ):
        p.add_argument(f"--{flag}_seeds", type=seed_list, default=frozenset(), metavar="L",
                       help=f"seeds that {what}")
    return p


def make_samples(object_code, seed, count):
    """The first `count` samples for (seed, object_code). Every sample draws the same number
    of values, so a shorter run yields a prefix of a longer one."""
    rng = random.Random(f"{object_code}:{seed}")
    samples = []
    for index in range(count):
        scale = rng.choice(SCALES)
        qpos_left = {j: rng.uniform(-1.0, 1.0) for j in JOINTS}
        qpos_right = {j: rng.uniform(-1.0, 1.0) for j in JOINTS}
        e_pen = rng.expovariate(50.0)
        e_dis = rng.expovariate(20.0)
        energy = e_dis + 100.0 * e_pen + rng.gauss(0.0, 0.01)
        samples.append({
            "object_code": object_code,
            "scale": scale,
            "qpos_left": qpos_left,
            "qpos_right": qpos_right,
            "energy": energy,
            "E_pen": e_pen,
            "E_dis": e_dis,
            "valid": e_pen < 0.02,
            "note": None,
            "seed": seed,
            "index": index,
        })
    return samples


def numeric_rows(samples):
    """One row of NUMERIC_COLS floats per sample, flattened."""
    out = []
    for s in samples:
        out += [float(s["index"]), s["scale"], s["energy"], s["E_pen"], s["E_dis"],
                1.0 if s["valid"] else 0.0, s["qpos_left"]["WRJTx"], s["qpos_right"]["WRJTx"]]
    return out


def npy_header(descr, shape):
    """An .npy v1.0 header, byte for byte as numpy writes it."""
    header = "{" + "".join(
        f"'{k}': {v!r}, "
        for k, v in sorted({"descr": descr, "fortran_order": False, "shape": shape}.items())
    ) + "}"
    # numpy leaves room to grow axis 0 in place.
    if shape:
        header += " " * (NPY_GROWTH_AXIS_MAX_DIGITS - len(repr(shape[0])))
    raw = header.encode("latin1")
    hlen = len(raw) + 1
    padlen = NPY_ALIGN - ((len(NPY_MAGIC) + 2 + hlen) % NPY_ALIGN)
    return NPY_MAGIC + struct.pack("<H", hlen + padlen) + raw + b" " * padlen + b"\n"


def pickle_int(n):
    """The opcode pickle uses for an int (BININT1/BININT2/BININT/LONG1); no memo ops."""
    return pickle.dumps(n, protocol=3)[2:-1]


def pickle_str(s):
    """BINUNICODE, without the memo op pickle.dumps would add."""
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def object_array_pickle(items):
    """A protocol-3 pickle of a 1-d numpy object array holding `items`, as numpy 1.x pickles
    it: _reconstruct(ndarray, (0,), b'b') then BUILD with the state
    (1, (n,), dtype('O8'), False, items). The prologue uses no memo ops, so the memo indices
    of the embedded list pickle cannot collide with it."""
    body = pickle.dumps(list(items), protocol=3)
    assert body[:2] == b"\x80\x03" and body[-1:] == b".", "unexpected pickle framing"
    body = body[2:-1]
    return b"".join((
        b"\x80\x03",                                   # PROTO 3
        b"cnumpy.core.multiarray\n_reconstruct\n",     # GLOBAL
        b"cnumpy\nndarray\n",                          # GLOBAL
        pickle_int(0), b"\x85",                        # (0,)
        b"C\x01b",                                     # SHORT_BINBYTES b'b'
        b"\x87",                                       # TUPLE3
        b"R",                                          # REDUCE -> empty ndarray
        b"(",                                          # MARK: array state
        pickle_int(1),                                 # pickle version
        pickle_int(len(items)), b"\x85",               # shape (n,)
        b"cnumpy\ndtype\n",                            # GLOBAL
        pickle_str("O8"), b"\x89\x88\x87",             # ('O8', False, True)
        b"R",                                          # REDUCE -> dtype
        b"(",                                          # MARK: dtype state
        pickle_int(3), pickle_str("|"), b"NNN",        # 3, '|', None, None, None
        pickle_int(-1), pickle_int(-1), pickle_int(63),  # elsize, alignment, flags
        b"t",                                          # TUPLE
        b"b",                                          # BUILD dtype
        b"\x89",                                       # fortran_order False
        body,                                          # the list of dicts
        b"t",                                          # TUPLE: array state
        b"b",                                          # BUILD array
        b".",                                          # STOP
    ))


def npy_object(items):
    return npy_header("|O", (len(items),)), object_array_pickle(items)


def npy_numeric(values, rows, typecode, descr):
    data = array.array(typecode, values)
    if sys.byteorder == "big":
        data.byteswap()
    return npy_header(descr, (rows, NUMERIC_COLS)), data.tobytes()


def write_atomic(path, data):
    """Writes `data` so that `path` is either absent or complete, even after a crash."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def first_attempt(state_dir, object_code, seed):
    """True exactly once per (object, seed): O_EXCL makes concurrent attempts agree."""
    os.makedirs(state_dir, exist_ok=True)
    marker = os.path.join(state_dir, f"flaky_{object_code}_s{seed}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def optimize(args):
    """Stands in for the optimizer loop: cheap arithmetic, progress lines, optional sleep."""
    iters = max(0, args.num_iterations)
    step = max(1, iters // 5)
    pause = args.work_ms / 1000.0 / max(1, iters // step) if iters else args.work_ms / 1000.0
    x = (args.seed * 2654435761) & 0xFFFFFFFF
    for it in range(iters):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        if (it + 1) % step == 0 or it + 1 == iters:
            log(f"iter {it + 1}/{iters} energy={x / 0x7FFFFFFF:.6f}")
            if pause:
                time.sleep(pause)
    if not iters and pause:
        time.sleep(pause)


# What --hold_mb keeps, round after round, for as long as the process lives.
HELD = []


def main(argv=None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.batch_size < 0:
        parser.error("--batch_size must be >= 0")
    if (args.flaky_seeds or args.sigkill_seeds) and not args.state_dir:
        parser.error("--flaky_seeds and --sigkill_seeds need --state_dir")
    seed, obj = args.seed, args.object_code
    pid_dir = os.environ.get("QUARRY_EXAMPLE_PID_DIR")
    if pid_dir:  # tests count the processes that served rounds
        os.makedirs(pid_dir, exist_ok=True)
        open(os.path.join(pid_dir, str(os.getpid())), "a").close()
    log(f"name={args.name} object={obj} seed={seed} batch={args.batch_size} "
        f"iterations={args.num_iterations} gpu={args.gpu} "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}")
    if unknown:
        log(f"ignoring unknown flags: {' '.join(unknown)}")

    if seed in args.fail_seeds:
        print(f"grasp_gen: injected failure for seed {seed} (object {obj})",
              file=sys.stderr, flush=True)
        return 3
    if seed in args.flaky_seeds and first_attempt(args.state_dir, obj, seed):
        print(f"grasp_gen: injected flaky failure for seed {seed} (object {obj}), "
              "first attempt", file=sys.stderr, flush=True)
        return 4
    if seed in args.sigkill_seeds and first_attempt(args.state_dir, obj, f"{seed}_kill"):
        log("killing myself with SIGKILL (injected crash)")
        os.kill(os.getpid(), 9)
    if seed in args.hang_seeds:
        log("hanging (injected)")
        while True:
            time.sleep(3600)

    optimize(args)
    if args.hold_mb > 0:
        HELD.append(b"x" * (args.hold_mb << 20))
    if args.sleep_ms > 0:
        time.sleep(args.sleep_ms / 1000.0)
    if seed in args.empty_seeds:
        log("no results (injected empty run)")
        return 0

    count = args.batch_size
    if args.yield_mode == "uneven":
        count = max(1, count - (seed % 5) * max(1, count // 10))
    samples = make_samples(obj, seed, count)
    if seed in args.dtype_seeds:
        header, payload = npy_numeric(numeric_rows(samples), count, "d", "<f8")
    elif args.format == "f32":
        header, payload = npy_numeric(numeric_rows(samples), count, "f", "<f4")
    else:
        header, payload = npy_object(samples)

    if args.output:
        path = args.output
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    else:
        out_root = args.out_root or os.path.join("..", "data", "experiments")
        out_dir = os.path.join(out_root, args.name, "results")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{obj}.npy")
    if seed in args.truncate_seeds:
        with open(path, "wb") as f:
            f.write(header + payload[: len(payload) // 2])
        log(f"wrote a truncated file (injected): {path}")
        return 0
    write_atomic(path, header + payload)
    if args.stats_file:
        os.makedirs(os.path.dirname(args.stats_file) or ".", exist_ok=True)
        stats = '{"attempts": %d, "successes": %d}\n' % (args.batch_size, count)
        write_atomic(args.stats_file, stats.encode())
    valid = sum(1 for s in samples if s["valid"])
    log(f"saved {count} samples ({valid} valid) to {path}")
    return 0


def serve_warm(base):
    """Warm mode: one main() per round, the round's flags after the ones the process was
    started with (argparse keeps the last), through quarry_generator's serve loop."""
    from quarry_generator import serve

    def handler(r):
        argv = list(base) + [
            "--name", r.round_name, "--object_code", r.object, "--seed", str(r.seed),
            "--batch_size", str(r.batch_size), "--num_iterations", str(r.num_iterations),
            "--output", r.output,
        ]
        if r.stats:
            argv += ["--stats_file", r.stats]
        code = main(argv)
        if code != 0:
            raise RuntimeError(f"grasp_gen ended the round with status {code}")

    # Samples draw from their own random.Random(object:seed): seeding the globals is not
    # needed for determinism, but costs nothing.
    return serve(handler)


if __name__ == "__main__":
    if os.environ.get("QUARRY_REPLY_FD"):
        sys.exit(serve_warm(sys.argv[1:]))
    sys.exit(main())
