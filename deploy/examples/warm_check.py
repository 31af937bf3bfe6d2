#!/usr/bin/env python3
"""Checks by hand that the example generators CI cannot run (they need torch or lerobot) write
the same bytes in both modes, and measures what warm mode saves.

    python3 deploy/examples/warm_check.py --python /path/to/venv/bin/python \\
        [--coordinator target/release/coordinator] [--gpus 0 0,1,2,3] [torch] [lerobot]

For each example (torch_grasp_gen.py with torch_grasp_job.toml, lerobot_recorder.py with
lerobot_job.toml; both by default) it runs the example's job with `coordinator run` in process
mode (one generator process per round) and in warm mode (`generator.mode = "warm"`), each on
every `--gpus` list (fake ids work without NVML: one agent each), in a fresh directory under
`--work`, keeping the rounds (`--keep_intermediate`). Then it checks that

- every run's finals have the same sha256 (the manifest's `final_sha256`, per object);
- every round directory holds the same files with the same sha256 in every run (a round
  written warm is byte-identical to the same round written by a fresh process);
- for lerobot, `lerobot_check.py` loads each final of the first warm run with lerobot's own
  reader and finds every frame equal to the rounds' (decoded videos included),

and prints each run's wall time. `--python` must import torch (and lerobot for the lerobot
example); the script itself needs only Python 3.11 (tomllib). Exits 1 at the first
difference, naming it.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# The example's job file, its script, and the flags a per-round process is given (what the
# job file's comment spells out for process mode).
EXAMPLES = {
    "torch": {
        "job": "torch_grasp_job.toml",
        "script": "torch_grasp_gen.py",
        "round_flags": ["--name", "{name}", "--object_code", "{object}",
                        "--batch_size", "{batch_size}", "--num_iterations", "{num_iterations}",
                        "--seed", "{seed}", "--output", "{output}"],
        "quota": 256, "batch": 64, "iterations": 100,
    },
    "lerobot": {
        "job": "lerobot_job.toml",
        "script": "lerobot_recorder.py",
        "round_flags": ["--seed", "{seed}", "--object", "{object}",
                        "--batch_size", "{batch_size}", "--out", "{output}"],
        "quota": 12, "batch": 4, "iterations": None,
    },
}


def toml_value(v):
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {v!r} as TOML")


def write_job(path, spec):
    """Writes a job spec of plain values and one level of tables ([generator],
    [generator.env])."""
    lines = []
    gen = spec.pop("generator")
    env = gen.pop("env", {})
    for k, v in spec.items():
        lines.append(f"{k} = {toml_value(v)}")
    lines.append("\n[generator]")
    for k, v in gen.items():
        lines.append(f"{k} = {toml_value(v)}")
    if env:
        lines.append("\n[generator.env]")
        for k, v in env.items():
            lines.append(f"{k} = {toml_value(v)}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def job_for(name, ex, warm, python, root):
    """The example's job file with the script and Python made absolute, the quota made small,
    its root `root`, and in process mode the round's flags in argv."""
    with open(os.path.join(HERE, ex["job"]), "rb") as f:
        spec = tomllib.load(f)
    gen = spec["generator"]
    argv = gen["argv"]
    fixed = argv[2:]
    argv = [python, os.path.join(HERE, ex["script"])] + fixed
    spec.update(root=root, target_count_per_object=ex["quota"], round_batch_size=ex["batch"])
    if ex["iterations"] is not None:
        spec["num_iterations"] = ex["iterations"]
    if warm:
        gen["mode"] = "warm"
    else:
        gen.pop("mode", None)
        argv += [f.replace("{output}", gen["output"]) for f in ex["round_flags"]]
    gen["argv"] = argv
    path = os.path.join(root, "job.toml")
    write_job(path, spec)
    return path, spec["exp_name"]


def tree_sha(path):
    """sha256 of every file under `path` (or of `path`), by relative name."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"": hashlib.sha256(f.read()).hexdigest()}
    out = {}
    for d, _, files in os.walk(path):
        for n in files:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run(coordinator, name, ex, warm, gpus, python, work):
    mode = "warm" if warm else "process"
    root = os.path.join(work, f"{name}-{mode}-{gpus.replace(',', '')}")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    job, exp = job_for(name, ex, warm, python, root)
    cmd = [coordinator, "run", "--job", job, "--progress", "off", "--gpus", gpus,
           "--keep_intermediate"]
    started = time.monotonic()
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    wall = time.monotonic() - started
    if p.returncode != 0:
        sys.exit(f"{name} {mode} gpus {gpus}: coordinator run exited {p.returncode}:\n"
                 f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    with open(os.path.join(root, "data/experiments", exp, "manifest.json")) as f:
        m = json.load(f)
    finals = {o: e["final_sha256"] for o, e in sorted(m["objects"].items())}
    rounds = {}
    for o, e in sorted(m["objects"].items()):
        for r, s in zip(e["rounds"], e["seeds"]):
            rname = f"{exp}__{o}__r{r}_s{s}"
            out = ex_output(root, rname, o)
            rounds[rname] = tree_sha(out)
    n_rounds = len(rounds)
    print(f"{name:8} {mode:8} gpus {gpus:8} {wall:7.1f} s  {n_rounds} rounds  "
          + "  ".join(f"{o}={h[:12]}" for o, h in finals.items()), flush=True)
    return {"root": root, "exp": exp, "manifest": m, "finals": finals, "rounds": rounds,
            "wall": wall, "label": f"{mode} gpus {gpus}"}


def ex_output(root, rname, obj):
    for rel in (f"out/{rname}/results/{obj}.npy", f"out/{rname}/dataset"):
        p = os.path.join(root, rel)
        if os.path.exists(p):
            return p
    sys.exit(f"round {rname}: no output kept under {root}/out")


def lerobot_check(python, r):
    m = r["manifest"]
    for o, e in sorted(m["objects"].items()):
        final = os.path.join(r["root"], "data/experiments", e["final"][0])
        rounds = [ex_output(r["root"], f"{r['exp']}__{o}__r{n}_s{s}", o)
                  for n, s in zip(e["rounds"], e["seeds"])]
        p = subprocess.run([python, os.path.join(HERE, "lerobot_check.py"), final] + rounds,
                           capture_output=True, text=True)
        last = p.stdout.strip().splitlines()[-1:] or [""]
        print(f"lerobot_check.py {o} ({r['label']}): {last[0]}", flush=True)
        if p.returncode != 0:
            sys.exit(f"lerobot_check.py failed on {final}:\n{p.stdout}\n{p.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", required=True, help="a Python that imports torch (and lerobot)")
    ap.add_argument("--coordinator", default=os.path.join(REPO, "target/release/coordinator"))
    ap.add_argument("--gpus", nargs="+", default=["0", "0,1,2,3"])
    ap.add_argument("--work", default=os.path.join(REPO, "target/warm_check"))
    ap.add_argument("examples", nargs="*", default=list(EXAMPLES), choices=list(EXAMPLES))
    a = ap.parse_args()
    coordinator = os.path.abspath(a.coordinator)
    for name in a.examples:
        ex = EXAMPLES[name]
        runs = [run(coordinator, name, ex, warm, g, a.python, os.path.abspath(a.work))
                for warm in (False, True) for g in a.gpus]
        ref = runs[0]
        for r in runs[1:]:
            if r["finals"] != ref["finals"]:
                sys.exit(f"{name}: the finals of {r['label']} differ from {ref['label']}: "
                         f"{r['finals']} != {ref['finals']}")
            if r["rounds"].keys() != ref["rounds"].keys():
                sys.exit(f"{name}: {r['label']} holds rounds {sorted(r['rounds'])}, "
                         f"{ref['label']} {sorted(ref['rounds'])}")
            for rname, files in r["rounds"].items():
                if files != ref["rounds"][rname]:
                    diff = sorted(k for k in files.keys() | ref["rounds"][rname].keys()
                                  if files.get(k) != ref["rounds"][rname].get(k))
                    sys.exit(f"{name}: round {rname} differs between {r['label']} and "
                             f"{ref['label']}: {diff}")
        print(f"{name}: finals and every round byte-identical over {len(runs)} runs", flush=True)
        if name == "lerobot":
            lerobot_check(a.python, next(r for r in runs if r["label"].startswith("warm")))
        cold = next(r for r in runs if r["label"] == f"process gpus {a.gpus[0]}")
        warm = next(r for r in runs if r["label"] == f"warm gpus {a.gpus[0]}")
        n = len(cold["rounds"])
        print(f"{name}: gpus {a.gpus[0]}: process mode {cold['wall']:.1f} s, warm "
              f"{warm['wall']:.1f} s for {n} rounds: {(cold['wall'] - warm['wall']) / n:.2f} s "
              "saved per round", flush=True)


if __name__ == "__main__":
    main()
