"""A personalised benchmark on real logs: LogHub-2k, one system per client, every strategy over seeds.

    python bench/smollm2.py                                  # once: runs/smollm2-135m (see that file)
    python bench/loghub.py --seeds 0 1 2                     # SmolLM2-135M, every strategy, 3 seeds
    python bench/loghub.py --model tiny --seeds 0 --strategies fdlora local fedavg   # cheap smoke run
    python bench/loghub.py --build-only                      # only the task: OUT/data, OUT/setting.yaml

The data are read where the user keeps them (`--data`, default ../shared/data/loghub-2k next to
the repository, the layout of LogHub's loghub_2k: <System>/<System>_2k.log_structured.csv); nothing
is copied into the package or the repository. The files written go to the run directory (--out).

**The task: the severity of a log line from its message.** Each client is one system that has a
level field (default Android, Apache, BGL, Hadoop: the LogHub-2k systems whose lines carry at
least two levels with enough distinct messages). The prompt is the message alone
(`log: <Content> =>`, cut to --max-chars characters); the response is its level normalised to
`SEVERITY`'s three names (` info`, ` warning`, ` error`). Why this tells methods apart:
- shared: words that mean trouble (error, failed, exception, interrupt) mean it on every system,
  so pooled rows (the global adapter) help where a client's own few rows do not cover a word;
- private: each system's own conventions. Hadoop logs `Address change detected` as WARN, BGL logs
  `instruction cache parity error corrected` as INFO and calls its failures FATAL (-> error) where
  Android and Hadoop say WARN (-> warning) for theirs; which of the two alarm names a system uses is
  its own. Each client scores candidates among its own labels (`accuracy`); `accuracy_all` among
  all three.
- scarce: --per-label distinct lines per label and client (balanced: the majority-label rate is
  about 0.5), picked round-robin over the system's event templates so that most templates appear
  once: a test line's template is often one the client never trained on.
Distinct lines only: a message that occurs twice is kept once, one logged at two levels is dropped,
so the trainer's split (test_fraction, fewshot_rows, seeded per run) cannot put a training line in
test; `check_split` asserts it on the trainer's own split of every seed run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "loghub-2k")
DEFAULT_SYSTEMS = ["Android", "Apache", "BGL", "Hadoop"]
# the level names of LogHub-2k's systems, normalised; a value not here is an error naming it
SEVERITY = {"V": "info", "D": "info", "I": "info", "notice": "info", "INFO": "info", "Info": "info",
            "W": "warning", "WARN": "warning", "WARNING": "warning", "Warning": "warning", "warn": "warning",
            "E": "error", "F": "error", "ERROR": "error", "error": "error", "Error": "error", "FATAL": "error",
            "SEVERE": "error"}
COLUMNS = ("Content", "EventId", "Level")
MODELS = ("smollm2", "tiny")


class TaskError(ValueError):
    """Input the task cannot be built from; the message names the file (and line) or system."""


def system_file(data_dir: str, system: str) -> str:
    return os.path.join(data_dir, system, f"{system}_2k.log_structured.csv")


def not_found(path: str) -> TaskError:
    return TaskError(f"{path}: not found (expected LogHub-2k's <System>/<System>_2k.log_structured.csv; "
                     f"pass the directory that holds the systems with --data)")


def read_system(path: str) -> list[dict]:
    """The structured CSV's rows (Content, EventId, Level), checked: TaskError names the file and line."""
    if not os.path.isfile(path):
        raise not_found(path)
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise TaskError(f"{path}: no column {', '.join(missing)} (its header: {reader.fieldnames}); "
                                f"the task needs {', '.join(COLUMNS)}")
            for row in reader:
                line = reader.line_num
                if None in row or any(row[c] is None for c in COLUMNS):
                    raise TaskError(f"{path}:{line}: {len(reader.fieldnames)} columns in the header, "
                                    f"a different number on this line")
                if row["Level"] not in SEVERITY:
                    raise TaskError(f"{path}:{line}: level {row['Level']!r} is not one this task knows "
                                    f"({', '.join(sorted(SEVERITY))})")
                rows.append({c: row[c] for c in COLUMNS})
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start + 1})") from None
    except csv.Error as e:
        raise TaskError(f"{path}: not readable as CSV ({e})") from None
    if not rows:
        raise TaskError(f"{path}: no rows")
    return rows


def system_rows(path: str, system: str, per_label: int, min_label: int, max_chars: int, task_seed: int):
    """One client's rows as the trainer's prompt/response dicts, and what was kept and dropped."""
    by_prompt: dict[str, set] = defaultdict(set)
    template: dict[str, str] = {}
    for r in read_system(path):
        prompt = f"log: {' '.join(r['Content'].split())[:max_chars]} =>"
        by_prompt[prompt].add(SEVERITY[r["Level"]])
        template.setdefault(prompt, r["EventId"])
    ambiguous = sorted(p for p, s in by_prompt.items() if len(s) > 1)  # one message at two levels: no answer
    pools: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))  # label -> template -> prompts
    for p, s in by_prompt.items():
        if len(s) == 1:
            pools[next(iter(s))][template[p]].append(p)
    available = {label: sum(map(len, t.values())) for label, t in pools.items()}
    kept = sorted(label for label, n in available.items() if n >= min_label)
    if len(kept) < 2:
        raise TaskError(f"{system}: {path} has {len(kept)} level(s) with at least {min_label} distinct messages "
                        f"(distinct messages per normalised level: {dict(sorted(available.items()))}); "
                        f"a client needs two: choose another system or lower --min-label")
    n = min(per_label, *(available[label] for label in kept))  # balanced: majority rate 1/len(kept)
    rng = random.Random(f"loghub:{task_seed}:{system}")
    rows = []
    for label in kept:
        queues = [sorted(ps) for _, ps in sorted(pools[label].items())]
        for q in queues:
            rng.shuffle(q)
        rng.shuffle(queues)
        picked = []
        while len(picked) < n:  # round-robin over templates: as many templates as possible, each once first
            for q in queues:
                if q and len(picked) < n:
                    picked.append(q.pop())
        rows += [{"prompt": p, "response": f" {label}", "label": label, "client": system} for p in picked]
    rng.shuffle(rows)
    info = {"system": system, "file": path, "labels": kept, "rows_per_label": n, "rows": len(rows),
            "templates": len({template[r["prompt"]] for r in rows}),
            "distinct_per_label": dict(sorted(available.items())),
            "dropped_labels": sorted(set(available) - set(kept)), "ambiguous_messages": len(ambiguous)}
    return rows, info


def build_task(data_dir: str, systems: list[str], out_dir: str, per_label: int = 24, min_label: int = 12,
               max_chars: int = 160, task_seed: int = 0) -> dict:
    """Write OUT/data/<System>.jsonl (one client each, in the order given) and OUT/task.json."""
    if len(set(systems)) != len(systems):
        raise TaskError(f"--systems {systems}: a system twice (one system per client)")
    for system in systems:  # every file before any is read: a typo in the last system fails at once
        if not os.path.isfile(system_file(data_dir, system)):
            raise not_found(system_file(data_dir, system))
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    task = {"data": os.path.abspath(data_dir), "clients": [], "files": []}
    for system in systems:
        rows, info = system_rows(system_file(data_dir, system), system, per_label, min_label, max_chars, task_seed)
        path = os.path.abspath(os.path.join(out_dir, "data", f"{system}.jsonl"))
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        task["clients"].append(info)
        task["files"].append(path)
    with open(os.path.join(out_dir, "task.json"), "w", encoding="utf-8") as f:
        json.dump(task, f, indent=1)
    return task


def setting(task: dict, model: str, out_dir: str, test_fraction: float, fewshot_rows: int, max_seq_len: int) -> dict:
    """The sections bench/compare.py --setting merges over every strategy's config."""
    n = len(task["files"])
    data = {"source": "jsonl", "files": task["files"], "test_fraction": test_fraction, "fewshot_rows": fewshot_rows}
    if model == "tiny":  # configs/demo.yaml's tiny Llama (pretrained on the scenario's text; 128 positions)
        return {"output_dir": os.path.join(out_dir, "run"), "topology": {"clients": [1] * n},
                "train": {"rounds": 4, "inner_steps": 5, "personal_steps": 40, "micro_batch_size": 8,
                          "max_seq_len": max_seq_len}, "data": data}
    # configs/real-smollm2.yaml's model, 4 clients; half its step budget (30 personal steps, 5 rounds
    # of K = 6), so that the 3-seed table fits this 2-core machine: a step of 4 clients takes about
    # 5 s here, and a 60-step personal stage's training loss was 0.04-0.18 by step 25 (seed 0)
    return {"output_dir": os.path.join(out_dir, "run"),
            "model": {"path": "runs/smollm2-135m", "config": None, "pretrained": None},
            "lora": {"personal": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                     "global": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
            "topology": {"clients": [1] * n},
            "train": {"rounds": 5, "inner_steps": 6, "personal_steps": 30, "micro_batch_size": 8, "lr": 0.001,
                      "max_seq_len": max_seq_len, "eval_batch_size": 32},
            "data": data}


def check_split(data_cfg: dict, n_clients: int, seed: int, model_path: str | None, max_seq_len: int) -> list[dict]:
    """The trainer's own split of the files for `seed`: asserts that no test prompt is a training or
    few-shot prompt and that every row fits max_seq_len uncut; returns per client the labels, the
    split sizes and the test split's majority-label rate (what a constant answer scores)."""
    from fdlora_cluster.config.sections import DataConfig
    from fdlora_cluster.data import get_tokenizer, read_clients, segments

    tok = get_tokenizer(model_path)
    out = []
    for c in read_clients(DataConfig(**data_cfg), n_clients, seed):
        seen = {e.prompt for e in c.train + c.fewshot}
        repeated = [e.prompt for e in c.test if e.prompt in seen]
        assert not repeated, f"client {c.client}: {len(repeated)} test lines repeat training lines, e.g. {repeated[0]!r}"
        longest = max(sum(len(ids) for ids, _ in segments(tok, e)) for e in c.train + c.fewshot + c.test)
        if longest > max_seq_len:
            raise TaskError(f"client {c.client}: a row is {longest} tokens, over max_seq_len {max_seq_len}: it "
                            f"would lose its start; lower --max-chars or raise --max-seq-len")
        counts = defaultdict(int)
        for e in c.test:
            counts[e.response] += 1
        out.append({"client": c.client, "name": c.name, "candidates": c.candidates, "train": len(c.train),
                    "fewshot": len(c.fewshot), "test": len(c.test), "longest_tokens": longest,
                    "majority_rate": max(counts.values()) / len(c.test)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help=f"LogHub-2k directory (default {DEFAULT_DATA})")
    ap.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS, help="one client each, in this order")
    ap.add_argument("--out", default="runs/loghub", help="run directory (default runs/loghub)")
    ap.add_argument("--model", choices=MODELS, default="smollm2",
                    help="smollm2: runs/smollm2-135m (bench/smollm2.py); tiny: the demo's tiny Llama (smoke test)")
    ap.add_argument("--per-label", type=int, default=24, help="distinct lines per label and client (default 24)")
    ap.add_argument("--min-label", type=int, default=12, help="a level with fewer distinct lines is dropped (12)")
    ap.add_argument("--max-chars", type=int, help="message characters kept (default 160; tiny 96)")
    ap.add_argument("--max-seq-len", type=int, help="train.max_seq_len (default 128; tiny 120)")
    ap.add_argument("--test-fraction", type=float, default=0.4)
    ap.add_argument("--fewshot-rows", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", help="default: bench/compare.py's (every strategy)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override for every job (repeatable), e.g. train.rounds=2")
    ap.add_argument("--build-only", action="store_true", help="write the task and its setting; run nothing")
    args = ap.parse_args(argv)
    tiny = args.model == "tiny"
    max_chars = args.max_chars or (96 if tiny else 160)
    max_seq_len = args.max_seq_len or (120 if tiny else 128)
    model_path = None if tiny else "runs/smollm2-135m"
    if model_path and not os.path.isfile(os.path.join(model_path, "tokenizer_config.json")):
        print(f"loghub: {model_path} not found: run `python bench/smollm2.py` first (or --model tiny)", file=sys.stderr)
        return 2
    try:
        task = build_task(args.data, args.systems, args.out, args.per_label, args.min_label, max_chars)
        own = setting(task, args.model, os.path.abspath(args.out), args.test_fraction, args.fewshot_rows, max_seq_len)
        splits = {s: check_split(own["data"], len(args.systems), s, model_path, max_seq_len) for s in args.seeds}
    except TaskError as e:
        print(f"loghub: {e}", file=sys.stderr)
        return 2
    import yaml

    path = os.path.join(args.out, "setting.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(own, f, sort_keys=False)
    for info, split in zip(task["clients"], splits[args.seeds[0]]):
        print(f"loghub: client {split['client']} {info['system']}: labels {info['labels']}, {info['rows_per_label']} "
              f"lines per label from {info['templates']} templates (dropped: {info['dropped_labels'] or 'none'}); "
              f"seed {args.seeds[0]}: train {split['train']}, few-shot {split['fewshot']}, test {split['test']} "
              f"(majority rate {split['majority_rate']:.3f}), longest row {split['longest_tokens']} tokens")
    print(f"loghub: no test line repeats a training line (seeds {args.seeds}); setting: {path}")
    if args.build_only:
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compare

    cmd = ["--setting", path, "--out", args.out, "--seeds", *map(str, args.seeds)]
    cmd += ["--strategies", *args.strategies] if args.strategies else []
    for o in args.overrides:
        cmd += ["--set", o]
    return compare.main(cmd)


if __name__ == "__main__":
    sys.exit(main())
