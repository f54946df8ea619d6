"""The project against plain Hugging Face ``transformers`` on the same hardware, same weights, same threads.

One random Llama-style HF model is built (``LlamaForCausalLM``, saved as safetensors) and imported with the
project's converter (:func:`megatron_qrm.conversion.import_hf`, what ``tools/convert_hf.py import`` runs) as
a policy and as a reward model. Two worker processes are started, one per side, each with the same
``torch.set_num_threads``; the driver asks them for one measurement at a time, in turns (project, HF,
project, HF, ...), so that the load of a shared machine hits both sides alike. Reported: median and min
over ``--repeats`` after ``--warmup`` untimed runs, tokens/s of each side and project/HF ratios
(> 1: the project is faster) of the median wall times, of the minimum wall times and of the median process
CPU times (less sensitive to other jobs on a shared machine). Before the timed runs of a sampling kind,
one untimed run of each side produces the tokens that are compared.

Work measured:

* ``train``: one Q-RM training step on ``--pairs`` preference pairs (``2 x pairs`` sequences of
  ``--seq-length`` tokens). Project: the trainer's own step (``build_model`` reward role + DDP + megatron
  optimizer, megatron-core's forward-backward schedule, ``rewards.scoring.train_forward_step``). HF:
  ``LlamaForTokenClassification(num_labels=1)`` forward, the same ``qrm_loss``, backward,
  ``torch.optim.AdamW`` step. The pairs share their prompt (half of each sequence), as preference pairs do.
  The project's step runs the ``[2 x pairs, seq-length]`` rows as they are (the same work as HF's).
* ``train_shared``: the same step in ``qrm train-rm``'s default layout: packed with each pair's prompt computed
  once (``data/packing.py``, ``pack_pairs_shared_prompt``; the same loss and gradients), against the same HF
  step (plain ``transformers`` computes each sequence whole). Tokens/s count the pairs' tokens on both sides.
* ``greedy_b1`` / ``greedy_bN``: greedy sampling of ``--new-tokens`` tokens after ``--prompt-len``-token
  prompts at batch 1 and ``--batch``. Project: :func:`megatron_qrm.rl.rollout.generate` (KV cache).
  HF: ``LlamaForCausalLM.generate(do_sample=False)`` (its default dynamic cache).
* ``mixed``: the same at ``--batch`` with prompt lengths spread uniformly over ``--mixed-lens`` (HF: left
  padding with an attention mask, as HF recommends for batched generation).
* ``long_short`` / ``long_long``: per-token decode time at ``--long-new-tokens`` against
  ``--short-new-tokens`` (batch ``--long-batch``): a step's cost should not grow with the cache beyond
  attention itself.

Greedy tokens are compared token by token (they must be identical; the LM head is scaled so that the
random model's logits are not flat and float noise cannot flip an argmax). ``--profile`` runs one more
measurement of each kind under ``torch.profiler`` in each worker and prints the top operators.

    python benchmarks/bench_vs_hf.py --quick           # a couple of minutes on 2 cores
    python benchmarks/bench_vs_hf.py                   # the issue's shapes (4 layers, hidden 512, ...)
    python benchmarks/bench_vs_hf.py --only greedy_bN,mixed --profile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

KINDS = ("train", "train_shared", "greedy_b1", "greedy_bN", "mixed", "long_short", "long_long")
QUICK = dict(num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=704,
             vocab_size=2048, pairs=2, seq_length=256, batch=8, prompt_len=32, new_tokens=32,
             mixed_lens="8,32", long_batch=4, long_new_tokens=256, short_new_tokens=32, repeats=5, warmup=1)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (%s)" % ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--num-attention-heads", type=int, default=8)
    ap.add_argument("--num-query-groups", type=int, default=2)
    ap.add_argument("--ffn-hidden-size", type=int, default=1408)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--pairs", type=int, default=8, help="training step: preference pairs (2x sequences)")
    ap.add_argument("--seq-length", type=int, default=512, help="training step: tokens per sequence")
    ap.add_argument("--batch", type=int, default=32, help="sampling: prompts per call (greedy_bN, mixed)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--mixed-lens", default="16,64", help="min,max prompt length of the mixed batch")
    ap.add_argument("--long-batch", type=int, default=8, help="batch of the long-decode measurement")
    ap.add_argument("--long-new-tokens", type=int, default=512)
    ap.add_argument("--short-new-tokens", type=int, default=64, help="the long_short measurement's new tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of EACH side (they run in turns)")
    ap.add_argument("--only", help=f"comma list out of {', '.join(KINDS)} (long = long_short,long_long)")
    ap.add_argument("--local-attention", default="auto", help="project side: auto | sdpa | unfused")
    ap.add_argument("--profile", action="store_true", help="profile one extra run of each kind on both sides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--worker", choices=("project", "hf"), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        defaults = {a.dest: a.default for a in ap._actions}
        for k, v in QUICK.items():
            if getattr(args, k) == defaults[k]:  # an explicit flag wins over the preset
                setattr(args, k, v)
    kinds = list(KINDS)
    if args.only:
        wanted = set()
        for k in args.only.split(","):
            k = k.strip()
            if k == "long":
                wanted |= {"long_short", "long_long"}
            elif k in KINDS:
                wanted.add(k)
            else:
                ap.error(f"--only: {k!r} is not one of {', '.join(KINDS)}")
        kinds = [k for k in KINDS if k in wanted]
    args.kinds = kinds
    return args


# ------------------------------------------------------------------------------------------------ workloads


def prompts_for(args, kind: str) -> list[list[int]]:
    """Token-id prompts (identical on both sides: generated from the seed)."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 17)
    if kind == "greedy_b1":
        n, lens = 1, [args.prompt_len]
    elif kind == "greedy_bN":
        n, lens = args.batch, [args.prompt_len] * args.batch
    elif kind == "mixed":
        lo, hi = (int(x) for x in args.mixed_lens.split(","))
        n = args.batch
        lens = torch.linspace(lo, hi, n).round().long()[torch.randperm(n, generator=g)].tolist()
    else:  # long_*
        n, lens = args.long_batch, [args.prompt_len] * args.long_batch
    return [torch.randint(4, args.vocab_size, (int(m),), generator=g).tolist() for m in lens]


def new_tokens_for(args, kind: str) -> int:
    if kind.startswith("long_"):
        return args.long_new_tokens if kind == "long_long" else args.short_new_tokens
    return args.new_tokens


def train_batch(args):
    """A Q-RM micro-batch: ``pairs`` chosen rows then ``pairs`` rejected rows, half prompt, half response."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from bench_rm_step import make_batch

    return make_batch(args.pairs, args.seq_length, args.vocab_size, 0.5, args.seed)


def tokens_of(args, kind: str) -> int:
    if kind.startswith("train"):
        return 2 * args.pairs * args.seq_length
    return len(prompts_for(args, kind)) * new_tokens_for(args, kind)


# ------------------------------------------------------------------------------------------------ project side


class ProjectSide:
    def __init__(self, args):
        import logging

        logging.disable(logging.WARNING)
        import torch

        from megatron_qrm import checkpointing, parallel
        from megatron_qrm.config import ModelConfig, ParallelConfig

        self.args, self.torch = args, torch
        parallel.initialize(ParallelConfig(seed=args.seed))
        self.cfg = ModelConfig.from_dict(checkpointing.read_config(os.path.join(args.model_dir, "policy"))["model"])
        self.fns = {}

    def _policy(self):
        if not hasattr(self, "policy"):
            from megatron_qrm import checkpointing
            from megatron_qrm.models import build_model

            self.policy = build_model(self.cfg, "policy", local_attention=self.args.local_attention)
            checkpointing.load_checkpoint(os.path.join(self.args.model_dir, "policy"), self.policy, load_rng=False)
        return self.policy

    def setup(self, kind: str):
        args = self.args
        if kind.startswith("train"):
            from bench_rm_step import train_step_fn  # the trainer's step, shared with bench_rm_step.py

            from megatron_qrm import checkpointing
            from megatron_qrm.models import PrecisionConfig, build_model
            from megatron_qrm.rewards.scoring import RewardLossConfig

            model = build_model(self.cfg, "reward", precision=PrecisionConfig(bf16=False),
                                local_attention=args.local_attention)
            checkpointing.load_checkpoint(os.path.join(args.model_dir, "reward"), model, load_rng=False)
            batch = train_batch(args)
            if kind == "train_shared":  # the trainer's default layout: packed, each pair's prompt once
                from megatron_qrm.data.packing import pack_pairs_shared_prompt

                batch = pack_pairs_shared_prompt(batch, pad_id=0)
            return train_step_fn(model, RewardLossConfig("qrm"), batch, lr=1e-6)
        from megatron_qrm.rl.rollout import SamplingConfig, generate

        model = self._policy()
        prompts = prompts_for(args, kind)
        n_new = new_tokens_for(args, kind)
        cfg = SamplingConfig(temperature=0.0, max_new_tokens=n_new)
        max_length = max(len(p) for p in prompts) + n_new

        def run():
            r = generate(model, prompts, cfg, eos_id=args.vocab_size + 1, pad_id=0, vocab_size=args.vocab_size,
                         max_length=max_length, seed=1)
            return [r.response_ids(i) for i in range(len(prompts))]

        return run


# ------------------------------------------------------------------------------------------------ HF side


class HFSide:
    def __init__(self, args):
        import torch

        self.args, self.torch = args, torch
        torch.manual_seed(args.seed)

    def setup(self, kind: str):
        args, torch = self.args, self.torch
        import transformers

        hf_dir = os.path.join(args.model_dir, "hf")
        if kind.startswith("train"):  # train_shared too: plain transformers computes every sequence whole
            from megatron_qrm.rewards import qrm_loss

            model = transformers.LlamaForTokenClassification.from_pretrained(
                hf_dir, num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
            batch = train_batch(args)
            tokens, mask = batch["tokens"], batch["response_mask"]

            def step():
                opt.zero_grad(set_to_none=True)
                scores = model(input_ids=tokens).logits.squeeze(-1)
                out = qrm_loss(scores, mask, beta=0.2, gamma=2.0)
                (out.loss_sum / out.num_valid.clamp(min=1)).backward()
                opt.step()
                return None

            return step
        if not hasattr(self, "lm"):
            self.lm = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                                     attn_implementation="sdpa").eval()
        model = self.lm
        prompts = prompts_for(args, kind)
        n_new = new_tokens_for(args, kind)
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        attn = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding (set-up, not timed)
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1

        def run():
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=n_new,
                                     min_new_tokens=n_new, pad_token_id=0, eos_token_id=None, use_cache=True)
            return out[:, width:].tolist()

        return run


# ------------------------------------------------------------------------------------------------ worker loop


def worker(args) -> int:
    """Line protocol on stdin/stdout: ``{"kind", "profile"}`` -> ``{"seconds", "output"}``."""
    import torch

    torch.set_num_threads(args.threads)
    side = (ProjectSide if args.worker == "project" else HFSide)(args)
    fns = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    out.write(json.dumps({"ready": True, "threads": torch.get_num_threads()}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        kind = req["kind"]
        if kind not in fns:
            fns[kind] = side.setup(kind)
        fn = fns[kind]
        if req.get("profile"):
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t0
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            out.write(json.dumps({"seconds": seconds, "profile": table}) + "\n")
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            result = fn()
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            out.write(json.dumps({"seconds": seconds, "cpu_seconds": cpu,
                                  "output": result if req.get("return_output") else None}) + "\n")
        out.flush()
    return 0


class Worker:
    """One side's worker process. ``tree``: run the project from that source tree instead of this one
    (its own bench_vs_hf.py and package; ``bench_ab.py`` compares two trees this way)."""

    def __init__(self, args, side: str, tree: str | None = None):
        script = os.path.join(tree, "benchmarks", "bench_vs_hf.py") if tree else os.path.abspath(__file__)
        argv = [sys.executable, script, "--worker", side, "--model-dir", args.model_dir]
        for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                  "vocab_size", "pairs", "seq_length", "batch", "prompt_len", "new_tokens", "mixed_lens",
                  "long_batch", "long_new_tokens", "short_new_tokens", "threads", "seed", "local_attention"):
            argv += ["--" + k.replace("_", "-"), str(getattr(args, k))]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
        env.pop("RANK", None)
        env.pop("WORLD_SIZE", None)
        if tree:
            env["PYTHONPATH"] = tree
        self.side = side if not tree else f"{side} ({tree})"
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=tree)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker exited (status {self.proc.wait()})")
        return json.loads(line)

    def ask(self, kind: str, profile: bool = False, return_output: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"kind": kind, "profile": profile, "return_output": return_output}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ------------------------------------------------------------------------------------------------ driver


def make_models(args, root: str) -> None:
    """A random HF Llama (safetensors) and its project imports (policy and reward)."""
    import torch
    import transformers

    from megatron_qrm.conversion import import_hf

    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_query_groups, max_position_embeddings=max(
            args.seq_length, args.prompt_len + args.long_new_tokens, 64 + args.new_tokens, 128) + 64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked logits: greedy argmax far from ties (float noise cannot flip it)
        model.lm_head.weight.mul_(8.0)
    hf = os.path.join(root, "hf")
    model.save_pretrained(hf, safe_serialization=True)
    for role in ("policy", "reward"):
        import_hf(hf, os.path.join(root, role), role=role, show_progress=False)


def compare_greedy(a: list[list[int]], b: list[list[int]]) -> tuple[int, int]:
    """(identical rows, rows)."""
    return sum(1 for x, y in zip(a, b) if x == y), len(a)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import platform

    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="bench_vs_hf_") as root:
        args.model_dir = root
        t0 = time.time()
        make_models(args, root)
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
              f"{os.cpu_count()} CPUs, {args.threads} torch threads per side; load average {os.getloadavg()}")
        print(f"model: {args.num_layers} layers, hidden {args.hidden_size}, heads {args.num_attention_heads}/"
              f"{args.num_query_groups} KV groups, FFN {args.ffn_hidden_size}, vocab {args.vocab_size} (fp32); "
              f"models built + imported in {time.time() - t0:.1f}s")
        workers, group = {}, None
        results = {}
        try:
            for kind in args.kinds:
                # fresh worker processes when going from training to sampling kinds: a worker that trained keeps
                # its optimizer state and activations' memory, and the sampling timed after it in the same
                # processes ran up to 1.5x slower in wall time at equal CPU time on the 2-core VM
                if kind.startswith("train") != group:
                    for w in workers.values():
                        w.close()
                    workers, group = {s: Worker(args, s) for s in ("project", "hf")}, kind.startswith("train")
                ok = None
                if not kind.startswith("train"):  # correctness first: greedy tokens identical on both sides
                    outs = {s: w.ask(kind, return_output=True)["output"] for s, w in workers.items()}
                    ok = compare_greedy(outs["project"], outs["hf"])
                for _ in range(max(0, args.warmup - (not kind.startswith("train")))):
                    for w in workers.values():
                        w.ask(kind)
                times = {s: [] for s in workers}
                cpu = {s: [] for s in workers}
                for r in range(args.repeats):
                    order = ("project", "hf") if r % 2 == 0 else ("hf", "project")  # alternate who goes first
                    for s in order:
                        answer = workers[s].ask(kind)
                        times[s].append(answer["seconds"])
                        cpu[s].append(answer["cpu_seconds"])
                n = tokens_of(args, kind)
                res = {s: {"median_s": statistics.median(t), "min_s": min(t), "times": t, "cpu_times": cpu[s],
                           "median_cpu_s": statistics.median(cpu[s]),
                           "tokens_per_s": n / statistics.median(t)} for s, t in times.items()}
                res["tokens"] = n
                res["ratio_median"] = res["hf"]["median_s"] / res["project"]["median_s"]
                res["ratio_min"] = res["hf"]["min_s"] / res["project"]["min_s"]
                res["ratio_cpu"] = res["hf"]["median_cpu_s"] / res["project"]["median_cpu_s"]
                if ok is not None:
                    res["greedy_identical_rows"] = ok
                results[kind] = res
                same = "" if ok is None else f"  greedy identical: {ok[0]}/{ok[1]} rows"
                print(f"{kind:<11} project {res['project']['median_s']:8.3f}s (min {res['project']['min_s']:.3f})  "
                      f"HF {res['hf']['median_s']:8.3f}s (min {res['hf']['min_s']:.3f})  "
                      f"{res['project']['tokens_per_s']:9.1f} vs {res['hf']['tokens_per_s']:9.1f} tok/s  "
                      f"ratio {res['ratio_median']:.2f}x (min-based {res['ratio_min']:.2f}x, CPU-time "
                      f"{res['ratio_cpu']:.2f}x){same}  "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                if args.profile:
                    for s, w in workers.items():
                        print(f"--- profile {kind} / {s}\n{w.ask(kind, profile=True)['profile']}", flush=True)
        finally:
            for w in workers.values():
                w.close()
    if "long_short" in results and "long_long" in results:
        for s in ("project", "hf"):
            short = results["long_short"][s]["median_s"] / args.short_new_tokens
            long = results["long_long"][s]["median_s"] / args.long_new_tokens
            results[f"decode_growth_{s}"] = long / short
            print(f"{s}: per-token decode time at {args.long_new_tokens} new tokens / at {args.short_new_tokens}: "
                  f"{long / short:.2f}x")
    summary = {k: round(v["ratio_median"], 3) for k, v in results.items() if isinstance(v, dict) and "ratio_median" in v}
    print("ratios project/HF (median, >1 = project faster):", json.dumps(summary))
    print(f"load average at the end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "model_dir"}, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
