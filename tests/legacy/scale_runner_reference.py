#!/usr/bin/env python3
"""A reference for the legacy single-machine loop, for Quarry's drop-in tests.

Written for Quarry from the behaviour of `tools/scale_runner.py` in the public repository
George121380/BimanGrasp-Generation (HEAD of its default branch as of 2026-12; single-GPU path,
`orchestrate_single_gpu`), which it mirrors step by step:

  * seed of object i, round r: seed_base + i * 100000 + r;
  * round r of object o runs `python main.py --name <exp>__<o>__r<r>_s<seed> --object_code o
    --batch_size B --num_iterations I --seed <seed> --gpu G [extra...]` with cwd
    <root>/BimanGrasp-Optimization and CUDA_VISIBLE_DEVICES=G, and its samples are read from
    <root>/data/experiments/<name>/results/<o>.npy;
  * rounds run while fewer than the quota are collected (a failed round is skipped); each
    round's samples are appended to the object's buffer, cut to the quota, and the buffer is
    written with np.save(object array) to <exp>/final/<o>/<o>.npy;
  * a finished object's round directories are removed unless --keep_intermediate;
  * `<exp>/manifest.json` records each object's `done`; with --resume an object done in an
    earlier session is skipped (its final stays where that session published it), so a run
    resumed with objects appended publishes the new objects alone;
  * when the loop ends and any round of this session gave samples: `seed_only` renames
    final/ to final_seed_<min>-<max>/ (over those rounds' seeds, replacing a directory of that
    name), `both` copies it there, `plain_only` leaves it.

One deliberate difference ("the dedup bug fixed"): scale_runner drops every sample whose
content signature (floats rounded to 6 decimals, JSON-dumped, SHA-1) equals one already kept,
which silently drops distinct samples that collide and raises on array-valued fields. This
reference keeps every sample, as Quarry does when no `[merge] dedup` fields are given.
`--root` replaces scale_runner's location-derived repository root.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--exp_name", required=True)
    p.add_argument("--object_code_list", nargs="+", required=True)
    p.add_argument("--target_count_per_object", type=int, required=True)
    p.add_argument("--round_batch_size", type=int, default=512)
    p.add_argument("--num_iterations", type=int, default=10000)
    p.add_argument("--seed_base", type=int, default=12345)
    p.add_argument("--max_rounds", type=int, default=1_000_000)
    p.add_argument("--gpu", default="0")
    p.add_argument("--final_dir_mode", default="seed_only", choices=["both", "seed_only", "plain_only"])
    p.add_argument("--keep_intermediate", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("extra", nargs=argparse.REMAINDER)
    a = p.parse_args()
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra

    base = os.path.join(a.root, "data", "experiments")
    exp_root = os.path.join(base, a.exp_name)
    gen_dir = os.path.join(a.root, "BimanGrasp-Optimization")
    manifest_path = os.path.join(exp_root, "manifest.json")
    manifest = {"objects": {}}
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    session_seeds = []
    for index, obj in enumerate(a.object_code_list):
        state = manifest["objects"].setdefault(obj, {"done": False})
        if a.resume and state["done"]:
            continue
        items = []
        round_id = 0
        while len(items) < a.target_count_per_object and round_id < a.max_rounds:
            seed = a.seed_base + index * 100_000 + round_id
            name = f"{a.exp_name}__{obj}__r{round_id}_s{seed}"
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(a.gpu))
            cmd = [sys.executable, "main.py", "--name", name, "--object_code", obj,
                   "--batch_size", str(a.round_batch_size), "--num_iterations", str(a.num_iterations),
                   "--seed", str(seed), "--gpu", str(a.gpu)] + extra
            if subprocess.run(cmd, cwd=gen_dir, env=env).returncode != 0:
                round_id += 1
                continue
            path = os.path.join(base, name, "results", f"{obj}.npy")
            got = list(np.load(path, allow_pickle=True).tolist()) if os.path.isfile(path) else []
            if got:
                session_seeds.append(seed)
                items = (items + got)[: a.target_count_per_object]
                out = os.path.join(exp_root, "final", obj)
                os.makedirs(out, exist_ok=True)
                np.save(os.path.join(out, f"{obj}.npy"), np.array(items, dtype=object), allow_pickle=True)
            round_id += 1
        state["done"] = len(items) >= a.target_count_per_object
        os.makedirs(exp_root, exist_ok=True)
        with open(manifest_path, "w") as f:
            json.dump(manifest, f)
        if state["done"] and not a.keep_intermediate:
            for entry in os.listdir(base):
                if entry.startswith(f"{a.exp_name}__{obj}__r"):
                    shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
    if session_seeds:
        src = os.path.join(exp_root, "final")
        dst = os.path.join(exp_root, f"final_seed_{min(session_seeds)}-{max(session_seeds)}")
        if a.final_dir_mode == "both":
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif a.final_dir_mode == "seed_only":
            shutil.rmtree(dst, ignore_errors=True)
            os.rename(src, dst)


if __name__ == "__main__":
    main()
