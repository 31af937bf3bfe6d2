"""Quarry's warm-generator protocol for generator authors, in pure Python.

A warm generator is started once by a Quarry agent (``generator.mode = "warm"``) and serves
many rounds. For each round the agent writes one JSON line on the generator's stdin; the
generator answers with one JSON line on the descriptor named by ``QUARRY_REPLY_FD``:
``{"round": <name>, "status": "done"}`` or ``{"round": <name>, "status": "failed",
"reason": "..."}``. Whatever it prints on stdout and stderr while a round runs is that
round's log. See docs/job-file.md, "Warm generators", for every field.

    from quarry_generator import serve

    def handler(r):          # r: a Round
        write_samples(r.output, r.object, r.seed, r.batch_size)

    if __name__ == "__main__":
        serve(handler)

``serve`` re-seeds ``random``, numpy and torch (when importable) from the round's seed before
each round, so a round depends only on its inputs (Quarry's determinism contract). A handler
that raises fails the round (the process goes on); SIGTERM ends the loop between rounds.
Started without ``QUARRY_REPLY_FD`` (process mode, or by hand), ``serve`` runs exactly one
round described by ``QUARRY_*`` variables and command-line flags, then exits 0 or 1.
"""

import json
import os
import random
import signal
import sys
import traceback

__all__ = ["Round", "serve", "serve_cli", "round_flags", "is_warm", "seed_everything"]

REPLY_FD_VAR = "QUARRY_REPLY_FD"


class Round:
    """One round, as the agent describes it."""

    __slots__ = ("round_name", "seed", "object", "object_index", "round", "attempt",
                 "batch_size", "num_iterations", "output", "outputs", "stats", "round_dir",
                 "cwd", "argv", "env", "raw")

    def __init__(self, fields):
        self.raw = dict(fields)
        self.round_name = fields.get("round_name", "")
        self.seed = int(fields.get("seed", 0))
        self.object = fields.get("object", "")
        self.object_index = int(fields.get("object_index", 0))
        self.round = int(fields.get("round", 0))
        self.attempt = fields.get("attempt", "")
        self.batch_size = int(fields.get("batch_size", 0))
        self.num_iterations = int(fields.get("num_iterations", 0))
        self.outputs = list(fields.get("outputs") or [])
        self.output = fields.get("output") or (self.outputs[0] if self.outputs else None)
        self.stats = fields.get("stats")
        self.round_dir = fields.get("round_dir")
        self.cwd = fields.get("cwd")
        self.argv = list(fields.get("argv") or [])
        self.env = dict(fields.get("env") or {})

    def __repr__(self):
        return f"Round({self.round_name!r}, seed={self.seed})"


def is_warm():
    """True when this process was started by a Quarry agent as a warm generator."""
    return bool(os.environ.get(REPLY_FD_VAR))


def seed_everything(seed):
    """Seeds ``random``, numpy's global generator and torch (CPU and CUDA) when they are
    importable, so that nothing a previous round drew carries over."""
    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is None:
        try:
            import numpy as np  # noqa: F811
        except ImportError:
            np = None
    if np is not None:
        np.random.seed(seed & 0xFFFFFFFF)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)


class _Stop(Exception):
    pass


def serve(handler, seed=True):
    """Serves rounds until stdin closes or SIGTERM comes; then returns 0. Without
    ``QUARRY_REPLY_FD`` runs one round (see :func:`run_once`) and returns its exit status.
    ``handler(round)`` does the work; it fails the round by raising. ``seed=False`` leaves
    seeding to the handler."""
    if not is_warm():
        return run_once(handler, seed=seed)
    reply = os.fdopen(int(os.environ[REPLY_FD_VAR]), "w", buffering=1)
    state = {"busy": False, "stop": False}

    def on_term(signum, frame):
        # Between rounds: leave at once. Mid-round: the agent stops the round; exit cleanly.
        state["stop"] = True
        if not state["busy"]:
            raise _Stop()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        while not state["stop"]:
            line = sys.stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            r = Round(json.loads(line))
            state["busy"] = True
            try:
                if seed:
                    seed_everything(r.seed)
                handler(r)
                answer = {"round": r.round_name, "status": "done"}
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as e:  # the round fails, the process goes on
                traceback.print_exc()
                answer = {"round": r.round_name, "status": "failed",
                          "reason": f"{type(e).__name__}: {e}"}
            finally:
                state["busy"] = False
            # The round's output must be out before its reply: the agent splits logs there.
            sys.stdout.flush()
            sys.stderr.flush()
            reply.write(json.dumps(answer) + "\n")
            reply.flush()
    except _Stop:
        pass
    return 0


def round_flags(r, stats=True):
    """The flags most generators take for a round: ``--seed S --object O --batch_size B
    --out OUTPUT``, and ``--stats STATS`` when the job names a yield sidecar (unless
    ``stats=False``, for a generator that writes its own)."""
    flags = ["--seed", str(r.seed), "--object", r.object, "--batch_size", str(r.batch_size),
             "--out", r.output]
    if stats and r.stats:
        flags += ["--stats", r.stats]
    return flags


def serve_cli(main, base=None, flags=round_flags, seed=True):
    """Serves rounds with a command-line generator's ``main(argv)``: each round calls it with
    the flags the process was started with (``base``, default ``sys.argv[1:]``) followed by the
    round's (``flags(round)``, default :func:`round_flags`; argparse keeps the last of a
    repeated flag), so one script runs the same code in both modes and writes the same bytes.
    A non-zero return fails the round; the process goes on."""
    base = list(sys.argv[1:] if base is None else base)

    def handler(r):
        code = main(base + list(flags(r)))
        if code:
            raise RuntimeError(f"the generator ended the round with status {code}")

    return serve(handler, seed=seed)


def run_once(handler, seed=True, environ=None):
    """Process mode: one round from the ``QUARRY_*`` variables a per-round run gets
    (``QUARRY_SEED``, ``QUARRY_ROUND``, ``QUARRY_OBJECT``, ``QUARRY_ATTEMPT``) and
    ``QUARRY_ROUND_JSON`` when set (a whole round line). Returns 0, or 1 when the handler
    raised."""
    env = os.environ if environ is None else environ
    fields = {}
    if env.get("QUARRY_ROUND_JSON"):
        fields.update(json.loads(env["QUARRY_ROUND_JSON"]))
    for key, var in (("seed", "QUARRY_SEED"), ("round", "QUARRY_ROUND"),
                     ("object", "QUARRY_OBJECT"), ("attempt", "QUARRY_ATTEMPT")):
        if var in env and key not in fields:
            fields[key] = env[var]
    r = Round(fields)
    if seed:
        seed_everything(r.seed)
    try:
        handler(r)
    except Exception:
        traceback.print_exc()
        return 1
    return 0
