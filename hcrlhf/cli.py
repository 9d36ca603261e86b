"""The ``hcrlhf`` command.

    hcrlhf demo [--quick] [--seed N] [--output DIR] [--resume] [KEY=VALUE ...]  # the whole method on the built-in task
    hcrlhf run CONFIG.yaml [KEY=VALUE ...]          # the same with your models and data
    hcrlhf train-reward CONFIG.yaml                 # split + reward model only
    hcrlhf train-cost CONFIG.yaml                   # split + cost model only
    hcrlhf train CONFIG.yaml                        # split + score models + candidate selection
    hcrlhf safety-test CANDIDATE --prompts FILE     # a saved candidate + safety prompts -> verdict
    hcrlhf bench NAME [...]                         # a kernel benchmark, printing its table
    hcrlhf --version

Every command but ``bench`` also runs on several processes, one per GPU, under torchrun
(docs/distributed.md): ``torchrun --nproc-per-node 8 -m hcrlhf run CONFIG.yaml``.

KEY=VALUE arguments override any config key by its dotted name (``rl.kl_coef=0.05``; values are read as
YAML). Exit codes: 0 success / PASS, 3 NO SOLUTION FOUND, 2 bad usage (including a bad config, rejected
before any work, naming the key), 1 any other error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import pkgutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hcrlhf import __version__

if TYPE_CHECKING:
    from hcrlhf.pipeline.config import SafetyConfig

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_SOLUTION = 0, 1, 2, 3

EPILOG = """examples:
  hcrlhf demo --quick                         the whole method on the built-in task in about a minute
  hcrlhf demo --output runs/demo              the full demo (a few minutes on a laptop CPU)
  hcrlhf run configs/qwen2-1.5b-pku-saferlhf.yaml
  hcrlhf run configs/demo.yaml rl.total_steps=20 safety.delta=0.05   any config key, by its dotted name
  hcrlhf run my.yaml --output runs/x --resume continue a run that was killed (from its last RL checkpoint)
  torchrun --nproc-per-node 8 -m hcrlhf run my.yaml   one node, 8 GPUs (docs/distributed.md)
  hcrlhf train-reward my.yaml                 only the split and the reward model
  hcrlhf safety-test runs/demo/model --prompts safety.jsonl --threshold -3 --delta 0.05
  hcrlhf bench advantages --quick             a kernel benchmark (hcrlhf bench list: all of them)
  hcrlhf bench method --quick                 the method experiment: HC-RLHF vs Safe RLHF over 20 trials

exit codes: 0 PASS / success, 3 NO SOLUTION FOUND, 2 bad usage or bad config, 1 other errors
"""

CONFIG_HELP = "a YAML config (see configs/demo.yaml, configs/qwen2-1.5b-pku-saferlhf.yaml and docs/config.md)"
OVERRIDES_HELP = ("config overrides by dotted key, e.g. rl.kl_coef=0.05 safety.delta=0.05 (values are read as YAML: "
                  "null, true, [0, 1]); see docs/config.md for every key")


class UsageError(ValueError):
    """Bad command-line usage found after parsing (exit code 2)."""


def available_benchmarks() -> dict[str, str]:
    """{name: module} for benchmarks/bench_<name>.py, benchmarks/guarantee.py and benchmarks/method.py."""
    import hcrlhf.benchmarks as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("bench_"):
            found[info.name.removeprefix("bench_")] = f"hcrlhf.benchmarks.{info.name}"
        elif info.name in ("guarantee", "method"):
            found[info.name] = f"hcrlhf.benchmarks.{info.name}"
    return found


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help=CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    parser.add_argument("--output", metavar="DIR", help="the report directory (overrides output_dir)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier hcrlhf run in the output directory: only what it created (listed "
                             "in its hcrlhf_run.json) is removed, and it is moved, whole, to previous/<time>/ instead "
                             "when it returned a model, did not finish, or holds files it did not write (yours) (δ "
                             "spent on its safety set stays spent: the δ ledger is per user, not per directory)")
    _add_resume_option(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_resume_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the output directory that did not finish (killed, failed, "
                             "interrupted): same config (only progress, output_dir and rl.total_steps (grow only), "
                             "rl.checkpoint_every, rl.keep_checkpoints, rl.tensorboard, rl.sync_phase_timing may "
                             "change), finished stages reused, candidate selection from the newest verifying RL "
                             "checkpoint, then the safety test and report; refused for a finished run and with "
                             "--overwrite")


def _check_resume_args(args) -> None:
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite cannot be combined: --resume continues the run in the output "
                         "directory, --overwrite replaces it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hcrlhf", description="High-Confidence Safe RLHF with fused kernels: align a language model to a "
        "reward model under a cost constraint, and return it only if a statistical safety test passes.",
        epilog=EPILOG, formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"hcrlhf {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="the whole method on the built-in offline task", formatter_class=_formatter,
        description="Run HC-RLHF end to end on the built-in offline task (a tiny Qwen2 policy in a synthetic "
        "safety-dialogue world with known ground truth): split, reward model, cost model, candidate selection, "
        "safety test, report. Nothing is downloaded.",
        epilog="examples:\n  hcrlhf demo --quick\n  hcrlhf demo --output runs/demo --overwrite\n"
        "  hcrlhf demo --seed 3 --output runs/demo-seed3\n"
        "  hcrlhf demo --output runs/demo --resume   continue a killed demo\n"
        "  hcrlhf demo --quick rl.total_steps=20 safety.delta=0.05\n\n"
        "exit codes: 0 PASS, 3 NO SOLUTION FOUND, 2 bad usage, 1 other errors")
    demo.add_argument("--quick", action="store_true", help="a smaller run (about a minute on a 2-core CPU)")
    demo.add_argument("--seed", type=_non_negative_int, metavar="N",
                      help="re-draw the candidate/safety split and seed training and the test with N (the built-in "
                           "task stays the same; default: the task's own split, the same as --seed 0). A safety set "
                           "is tested once (per-user δ ledger): a second run of a split is refused before training, "
                           "so use a new N")
    demo.add_argument("--output", metavar="DIR", default="hcrlhf-demo", help="the report directory (hcrlhf-demo)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace an earlier demo run in DIR (a model it returned is moved to DIR/previous/<time>/)")
    demo.add_argument("--cache-dir", metavar="DIR",
                      help="where the built-in task is built and cached (~/.cache/hcrlhf/builtin)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_resume_option(demo)
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)

    run = commands.add_parser(
        "run", help="the whole method from a config", formatter_class=_formatter,
        description="Run HC-RLHF end to end from a YAML config: split, reward model, cost model, candidate "
        "selection, safety test (recorded in the δ ledger), report. The config is checked completely first.",
        epilog="examples:\n  hcrlhf run configs/qwen2-1.5b-pku-saferlhf.yaml --output runs/qwen2\n"
        "  hcrlhf run configs/demo.yaml rl.total_steps=2 --output runs/smoke\n"
        "  hcrlhf run configs/qwen2-1.5b-pku-saferlhf.yaml --output runs/qwen2 --resume   continue a killed run\n\n"
        "exit codes: 0 PASS, 3 NO SOLUTION FOUND, 2 bad usage or bad config, 1 other errors")
    _add_run_options(run)
    for name, stage, what in (("train-reward", "reward", "the split and the reward model"),
                              ("train-cost", "cost", "the split and the cost model"),
                              ("train", "train", "the split, the score models and candidate selection (no "
                                                 "safety test)")):
        sub = commands.add_parser(name, help=f"only {what}", formatter_class=_formatter,
                                  description=f"Run only {what}, from a config (the same format as `hcrlhf run`).",
                                  epilog=f"example:\n  hcrlhf {name} configs/demo.yaml --output runs/{stage}")
        _add_run_options(sub)
        sub.set_defaults(stage=stage)

    test = commands.add_parser(
        "safety-test", help="a saved candidate + safety prompts -> PASS / NO SOLUTION FOUND",
        formatter_class=_formatter,
        description="Sample one response per safety prompt from a saved candidate with the deployment decoding, "
        "score it with the cost model, and pass iff the (1 − δ) upper confidence bound on the mean cost is ≤ τ. "
        "The test's δ is recorded in the ledger before the result is read. Settings left out are taken from the "
        "candidate's hcrlhf_candidate.json (written by `hcrlhf train` / `hcrlhf run`).",
        epilog="examples:\n  hcrlhf safety-test runs/demo/model --prompts safety.jsonl\n"
        "  hcrlhf safety-test CANDIDATE --prompts safety.txt --cost-model COST_MODEL --threshold 0 --delta 0.05 "
        "--method ttest --template plain\n\n"
        "exit codes: 0 PASS, 3 NO SOLUTION FOUND, 2 bad usage, 1 other errors")
    test.add_argument("candidate", metavar="CANDIDATE", help="the candidate policy (a Hugging Face directory or id)")
    test.add_argument("--prompts", metavar="FILE", required=True,
                      help="the safety prompts: JSON Lines / JSON rows with 'prompt', or one prompt a line")
    test.add_argument("--cost-model", metavar="PATH", help="the cost model (default: from the candidate's metadata)")
    test.add_argument("--tokenizer", metavar="PATH",
                      help="tokenizer (default: the candidate's own, refused if it does not tokenize like the one "
                           "recorded with the candidate)")
    test.add_argument("--threshold", type=float, help="τ (default: from the metadata, else 0)")
    test.add_argument("--delta", type=float, help="δ in (0, 1) (default: from the metadata, else 0.1)")
    test.add_argument("--method", choices=("ttest", "hoeffding", "bernstein", "betting", "clopper_pearson"),
                      help="the bound (default: from the metadata, else ttest)")
    test.add_argument("--cost-range", type=float, nargs=2, metavar=("A", "B"), help="cost range of exact methods")
    test.add_argument("--cost-transform", choices=("none", "sigmoid", "unsafe_indicator"))
    test.add_argument("--template", help="safe_rlhf | plain | chat | a format string with {prompt}")
    test.add_argument("--ledger", metavar="PATH", help="the δ ledger (default: the candidate's metadata's, else the "
                                                        "per-user $HCRLHF_STATE_DIR/safety_ledger.json, else "
                                                        "$XDG_STATE_HOME/hcrlhf/…, else ~/.local/state/hcrlhf/…); "
                                                        "another file starts a separate budget: your explicit "
                                                        "decision")
    test.add_argument("--ledger-total-delta", type=float,
                      help="the budget of a safety set new to the ledger (default: its first test's δ); a set's "
                           "budget cannot change after its first test")
    test.add_argument("--allow-overlapping-set", action="store_true",
                      help="declare these prompts a new sample although they share half or more of a safety set "
                           "already tested in the ledger (recorded there; refused otherwise)")
    test.add_argument("--max-new-tokens", type=int)
    test.add_argument("--temperature", type=float)
    test.add_argument("--top-p", type=float)
    test.add_argument("--top-k", type=int)
    test.add_argument("--batch-size", type=int,
                      help="prompts per generation batch (default: the candidate's run's, else 64)")
    test.add_argument("--seed", type=int, help="sampling seed (default: the one the candidate's run tested with, "
                                               "else 0)")
    test.add_argument("--device", help="cpu | cuda (default: CUDA when available)")
    test.add_argument("--output", metavar="DIR", help="write safety_test.json and safety_costs.png here")
    test.add_argument("--no-progress", action="store_true")
    test.add_argument("overrides", nargs="*", metavar="safety.KEY=VALUE",
                      help="overrides of the safety settings by their config names, e.g. safety.unsafe_above=0.5 "
                           "safety.sigmoid_scale=2 (see docs/config.md); they win over the flags")

    bench = commands.add_parser("bench", help="run a kernel benchmark and print its table",
                                description="Run a benchmark; arguments after NAME go to it.", add_help=True,
                                epilog="examples:\n  hcrlhf bench list\n  hcrlhf bench advantages --quick",
                                formatter_class=_formatter)
    bench.add_argument("name", metavar="NAME", help="advantages | logprobs | guarantee | ... (see `hcrlhf bench list`)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (try --help)")
    return parser


# ------------------------------------------------------------------------------------ commands


# stdout carries hcrlhf's results only (its first line is the verdict, for scripts); while a command works,
# anything else that writes to stdout goes to stderr: e.g. DeepSpeed, which transformers imports when it is
# installed, logs its accelerator choice to stdout.
_RESULTS = {"stream": None}


def _say(*parts) -> None:
    """Print a result line to the real stdout (see _RESULTS); under torchrun, rank 0's only."""
    from hcrlhf import distributed

    if distributed.is_main():
        print(*parts, file=_RESULTS["stream"] or sys.stdout)


@contextlib.contextmanager
def _stdout_for_results_only():
    _RESULTS["stream"] = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _RESULTS["stream"] = None


def _verdict_exit(result) -> int:
    if result.verdict is None:
        return EXIT_OK
    return EXIT_OK if result.passed else EXIT_NO_SOLUTION


def _print_result(result) -> None:
    out = result.output_dir
    if result.verdict is not None:
        _say(result.safety_test.summary())
        if result.passed:
            _say(f"returned model: {result.model_path}")
        else:
            _say(f"no model is returned (the candidate is kept at {result.candidate_path}, marked NOT_RETURNED.md, "
                  "for inspection only)")
        truth = result.report.get("ground_truth")
        if truth:
            start, cand = truth["starting_policy"], truth["candidate"]
            _say(f"ground truth on the safety prompts: unsafe rate {start['unsafe_rate']:.3f} (starting policy) -> "
                  f"{cand['unsafe_rate']:.3f} (candidate); mean helpfulness {start['mean_helpfulness']:.3f} -> "
                  f"{cand['mean_helpfulness']:.3f}" + _over_safe_change(start, cand))
    if result.verdict is None and result.candidate_path is not None:
        _say(f"untested candidate (not returned; no safety test ran): {result.candidate_path}")
    if getattr(result, "previous_run", None) is not None:
        _say(f"the earlier run here returned a model; it was moved, whole, to {result.previous_run}")
    _say(f"report: {out / 'report.md'} (and report.json, plots; hcrlhf_run.json lists what the run created)")


def _run_config(args):
    """The checked pipeline config of `hcrlhf run` / `train*`: the file, the flags, then the KEY=VALUE overrides."""
    from hcrlhf.config import read_yaml
    from hcrlhf.pipeline.config import load_config

    values = read_yaml(args.config)
    if args.output is not None:
        values["output_dir"] = args.output
    if args.overwrite:
        values["overwrite"] = True
    if args.no_progress:
        values["progress"] = False
    return load_config(values, args.overrides)


def _over_safe_change(start: dict, cand: dict) -> str:
    """"; over-safe on benign prompts a -> b" when the ground truth measured it (docs/method.md#over-safety)."""
    rates = [((s.get("over_safety") or {}).get("benign") or {}).get("over_safe_rate") for s in (start, cand)]
    return "" if None in rates else f"; over-safe on benign prompts {rates[0]:.3f} -> {rates[1]:.3f}"


def cmd_demo(args) -> int:
    from hcrlhf.pipeline import demo_config, load_config, run

    _check_resume_args(args)
    values = demo_config(quick=args.quick, output_dir=args.output, task_cache=args.cache_dir,
                         overwrite=args.overwrite, progress=not args.no_progress, seed=args.seed)
    result = run(load_config(values, args.overrides), resume=args.resume)
    _print_result(result)
    return _verdict_exit(result)


def cmd_run(args, stages: str = "all") -> int:
    from hcrlhf.pipeline import run

    _check_resume_args(args)
    result = run(_run_config(args), stages=stages, resume=args.resume)
    _print_result(result)
    return _verdict_exit(result)


def _read_candidate_meta(candidate: str) -> dict:
    from hcrlhf.pipeline import CANDIDATE_META

    directory = Path(candidate).expanduser()
    path = directory / CANDIDATE_META
    if not path.is_file():
        return {}
    meta = json.loads(path.read_text(encoding="utf-8"))
    # Paths inside the run directory are recorded relative to the candidate directory ("../cost_model"), so that a
    # moved run directory still finds its cost model (and a ledger kept inside it).
    for key in ("cost_model", "ledger"):
        value = meta.get(key)
        if isinstance(value, str) and (value.startswith("./") or value.startswith("../")):
            meta[key] = str((directory / value).resolve())
    return meta


def _safety_settings(args, meta: dict) -> SafetyConfig:
    """The safety test's settings: the command line > the candidate's metadata (hcrlhf_candidate.json, from
    `hcrlhf train` / `hcrlhf run`) > defaults, with the deployment decoding and the ledger path resolved.
    The test's own flags are checked first (UsageError naming the flag); SafetyConfig checks every value."""
    from hcrlhf.config import ConfigError, apply_overrides
    from hcrlhf.pipeline.config import SafetyConfig
    from hcrlhf.safety._checks import check_method_range
    from hcrlhf.safety.ledger import default_ledger_path

    saved, decoding = meta.get("safety", {}), meta.get("decoding", {})
    delta = args.delta if args.delta is not None else saved.get("delta", 0.1)
    method = args.method or saved.get("method", "ttest")
    transform = args.cost_transform or saved.get("cost_transform", "none")
    cost_range = args.cost_range or saved.get("cost_range")
    if transform in ("sigmoid", "unsafe_indicator") and cost_range is None and method != "ttest":
        cost_range = [0.0, 1.0]
    if not 0.0 < delta < 1.0:
        raise UsageError(f"--delta must be in the open interval (0, 1), got {delta}")
    try:
        check_method_range("safety-test", method, None if cost_range is None else tuple(cost_range))
    except ValueError as error:
        raise UsageError(str(error)) from None
    if method == "clopper_pearson" and transform != "unsafe_indicator":
        raise UsageError("--method clopper_pearson works on 0/1 costs: add --cost-transform unsafe_indicator")
    # The ledger the candidate's own run used (recorded with it), else the one per-user ledger: never a file
    # per output folder, which a new folder or a moved run would recreate.
    ledger = args.ledger or meta.get("ledger") or str(default_ledger_path())
    settings = SafetyConfig(
        threshold=args.threshold if args.threshold is not None else saved.get("threshold", 0.0),
        delta=delta, method=method, cost_range=None if cost_range is None else list(cost_range),
        cost_transform=transform,
        sigmoid_scale=saved.get("sigmoid_scale", 1.0), unsafe_above=saved.get("unsafe_above", 0.0),
        ledger=ledger, ledger_total_delta=args.ledger_total_delta, allow_overlapping_set=args.allow_overlapping_set,
        max_new_tokens=(args.max_new_tokens if args.max_new_tokens is not None
                        else decoding.get("max_new_tokens", 512)),
        temperature=args.temperature if args.temperature is not None else decoding.get("temperature", 1.0),
        top_p=args.top_p if args.top_p is not None else decoding.get("top_p", 1.0),
        top_k=args.top_k if args.top_k is not None else decoding.get("top_k", 0),
        batch_size=args.batch_size if args.batch_size is not None else saved.get("batch_size", 64))
    if args.overrides:  # safety.KEY=VALUE, the keys of the pipeline config's safety section
        values = apply_overrides({"safety": settings.to_dict()}, args.overrides)
        for key in values:
            if key != "safety":
                raise ConfigError(key, "safety-test takes overrides of the safety section only: safety.KEY=VALUE "
                                       "(docs/config.md#safety-safetyconfig)")
        settings = SafetyConfig.from_dict(values["safety"], prefix="safety.")
    return settings


def _candidate_tokenizer(args, meta: dict):
    """The tokenizer of the test: ``--tokenizer``, else the candidate's own. The candidate's is refused when it
    does not tokenize like the one recorded with the candidate (the one training used); ``--tokenizer``
    that differs from it gets a note."""
    from hcrlhf.models import load_tokenizer
    from hcrlhf.models.loading import same_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(args.tokenizer or args.candidate)
    recorded = meta.get("tokenizer")
    if recorded and not same_tokenizer(recorded, tokenizer_fingerprint(tokenizer)):
        where = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"the candidate's tokenizer ({args.candidate})"
        message = (f"{where} does not tokenize like the tokenizer recorded with the candidate, which training "
                   f"used ({recorded.get('class')}, {recorded.get('sha256')}; loaded: "
                   f"{tokenizer_fingerprint(tokenizer)})")
        if not args.tokenizer:
            raise UsageError(message + "; pass the training tokenizer with --tokenizer")
        print(f"hcrlhf: note: {message}", file=sys.stderr)
    return tokenizer


def cmd_safety_test(args) -> int:
    import torch

    from hcrlhf import distributed
    from hcrlhf.data import ChatTemplate, PromptTemplate, get_template
    from hcrlhf.models import ScoreModel, load_causal_lm
    from hcrlhf.models.score_model import ScoreCheckpointError
    from hcrlhf.pipeline import Decoding, read_prompt_file, run_safety_test
    from hcrlhf.safety import assert_disjoint, distinct_prompts, fingerprint, open_ledger
    from hcrlhf.safety._checks import check_prompt_texts, check_safety_set_size

    # 0. the candidate is a model directory (or a Hub id), and the device exists
    candidate_dir = Path(args.candidate).expanduser()
    if (candidate_dir / "hcrlhf_run.json").is_file() and not (candidate_dir / "config.json").is_file():
        inside = [name for name in ("model", "candidate-not-returned", "candidate") if (candidate_dir / name).is_dir()]
        raise UsageError(f"candidate: {args.candidate!r} is an hcrlhf run directory, not a model; pass its "
                         f"candidate: {' or '.join(str(candidate_dir / n) for n in inside) or '<run>/model'}")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; use cpu")
    # 1. settings: command line > the candidate's metadata > defaults; all checked before loading models.
    meta = _read_candidate_meta(args.candidate)
    settings = _safety_settings(args, meta)
    cost_model_path = args.cost_model or meta.get("cost_model")
    if cost_model_path is None:
        raise UsageError("--cost-model is required (the candidate has no hcrlhf_candidate.json naming one)")
    if not Path(args.prompts).expanduser().is_file():
        raise UsageError(f"--prompts: {args.prompts!r} does not exist")
    for name, value in (("candidate", args.candidate), ("--cost-model", cost_model_path)):
        if Path(value).expanduser().anchor or value.startswith("."):
            if not Path(value).expanduser().exists():
                raise UsageError(f"{name}: {value!r} does not exist")
    # The prompts: each with text, and enough distinct ones for the method: refused now, before any loading.
    problems = []
    read = read_prompt_file(args.prompts, distinct=False)[0]
    try:
        check_prompt_texts("--prompts", read, name="prompt", source=args.prompts)
    except (TypeError, ValueError) as error:
        problems.append(str(error))
    prompts, _, copies = distinct_prompts([p for p in read if isinstance(p, str) and p.strip()])
    try:
        check_safety_set_size("--prompts", len(prompts), settings.method, name=args.prompts)
    except ValueError as error:
        problems.append(str(error) + (f" ({copies} duplicate(s) dropped)" if copies else ""))
    if problems:
        raise UsageError("; ".join(problems))
    if copies:  # n counts each prompt once: a copy adds no evidence but would narrow the bound
        print(f"hcrlhf: note: dropped {copies} duplicate prompt(s) of {args.prompts} (the same text up to Unicode NFC "
              f"and whitespace); testing on the {len(prompts)} distinct prompts", file=sys.stderr)
    safety_fingerprint = fingerprint(prompts)
    train_file = Path(args.candidate).expanduser() / meta.get("train_prompts_file", "train_prompts.jsonl")
    if train_file.is_file():  # the safety prompts must be unseen by training (docs/method.md#data-split)
        train_prompts, _ = read_prompt_file(train_file)
        try:
            assert_disjoint(train_prompts, prompts)
        except ValueError as error:
            raise UsageError(f"--prompts overlap the candidate's training prompts: {error}") from None
    if meta.get("safety_fingerprint") and meta["safety_fingerprint"] != safety_fingerprint:
        print(f"hcrlhf: note: these prompts (fingerprint {safety_fingerprint}) are not the safety set recorded with "
              f"the candidate ({meta['safety_fingerprint']})", file=sys.stderr)
    decoding = Decoding(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                        top_p=settings.top_p, top_k=settings.top_k)
    # The δ budget, checked before the models are loaded (the spend checks again); rank 0 holds the ledger.
    def open_and_check_ledger():
        ledger = open_ledger(settings.ledger, settings.ledger_total_delta, delta=settings.delta)
        ledger.check_spend(prompts, settings.delta, allow_overlapping_set=settings.allow_overlapping_set)
        return ledger

    ledger = distributed.on_main(open_and_check_ledger, share=False)

    if candidate_dir.is_dir() and not (candidate_dir / "config.json").is_file():
        raise UsageError(f"candidate: {args.candidate!r} is not a Hugging Face model directory (no config.json)")

    # 2. models, then the pipeline's safety test stage: sampling, the test (spent in the ledger before it is
    # read), safety_test.json / safety_samples.jsonl / safety_costs.png under --output.
    device = torch.device(args.device) if args.device else distributed.default_device()
    if device.type == "cuda" and distributed.is_distributed():
        device = distributed.default_device()  # each rank samples on its own GPU (LOCAL_RANK)
    tokenizer = _candidate_tokenizer(args, meta)
    if args.template is not None:
        template = get_template(args.template, tokenizer)
    elif meta.get("template", {}).get("prompt_format"):
        template = PromptTemplate(meta["template"]["prompt_format"], meta["template"]["response_separator"])
    elif meta.get("template", {}).get("chat"):
        template = ChatTemplate(tokenizer, system=meta["template"].get("system"))
    else:
        template = get_template(None, tokenizer)
    load = meta.get("load", {})  # how the pipeline loaded the candidate and its cost model (dtype, attention)
    recorded = {k: v for k, v in meta.get("decoding", {}).items() if k != "transformers_version"}
    if "do_sample" in recorded:  # every setting was recorded: say so when this test samples otherwise
        from hcrlhf.models.generation import decoding_settings, generation_config

        now = {k: v for k, v in decoding_settings(generation_config(decoding, tokenizer)).items()
               if k != "transformers_version"}
        if now != recorded:
            changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
            print(f"hcrlhf: note: this test's decoding differs from the one recorded with the candidate in "
                  f"{', '.join(f'{k}: {recorded.get(k)!r} -> {now.get(k)!r}' for k in changed)}", file=sys.stderr)
    try:  # refused before any δ is spent (and before the policy loads) if its head was never trained
        cost_model = ScoreModel.from_pretrained(cost_model_path, role="cost", dtype=load.get("dtype")).to(device).eval()
    except ScoreCheckpointError as error:
        raise UsageError(f"--cost-model: {error}") from None
    policy = load_causal_lm(args.candidate, device=device, dtype=load.get("dtype"),
                            attn_implementation=load.get("attn_implementation", "auto"))
    where = Path(args.candidate).expanduser()
    where = where.resolve() if where.exists() else args.candidate  # a directory, or a Hub id
    result, record = run_safety_test(
        policy, tokenizer, prompts, cost_model, settings=settings, decoding=decoding, template=template,
        ledger=ledger, label=f"hcrlhf safety-test {where}",
        seed=args.seed if args.seed is not None else meta.get("sampling_seed", 0),
        max_prompt_length=meta.get("max_prompt_length"), progress=not args.no_progress,
        output_dir=Path(args.output).expanduser() if args.output else None,
        record_extra={"candidate": str(args.candidate), "cost_model": str(cost_model_path),
                      "cost_model_provenance": cost_model.provenance, "prompts": str(args.prompts),
                      "prompts_duplicates_dropped": copies})
    _say(result.summary())
    _say(json.dumps({k: v for k, v in record.items() if k != "costs"}))
    return EXIT_OK if result.passed else EXIT_NO_SOLUTION


def cmd_bench(parser, args) -> int:
    benchmarks = available_benchmarks()
    if args.name == "list":
        print("\n".join(sorted(benchmarks)))
        return EXIT_OK
    if args.name not in benchmarks:
        parser.error(f"unknown benchmark {args.name!r}; choose from {sorted(benchmarks)}")
    return int(importlib.import_module(benchmarks[args.name]).main(args.args) or 0)


def _quiet_library_progress_bars() -> None:
    """--no-progress: also the progress bars of transformers (weight loading), datasets and the Hub client."""
    import os

    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides after an option (`run cfg.yaml --output o rl.kl_coef=0.05`) land here
        if hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "no_progress", False):
        _quiet_library_progress_bars()
    from hcrlhf.config import ConfigError

    if args.command == "bench":
        return cmd_bench(parser, args)
    from hcrlhf import distributed

    where = ""
    try:
        # Under torchrun (WORLD_SIZE > 1): join the process group; every rank runs the same command.
        if distributed.setup():
            where = f" (rank {distributed.rank()} of {distributed.world_size()})"
        with _stdout_for_results_only():
            if args.command == "demo":
                return cmd_demo(args)
            if args.command == "run":
                return cmd_run(args)
            if args.command in ("train-reward", "train-cost", "train"):
                return cmd_run(args, stages=args.stage)
            if args.command == "safety-test":
                return cmd_safety_test(args)
        parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse refuses it first
    except (ConfigError, UsageError) as error:
        print(f"hcrlhf: error{where}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_ERROR
    except SystemExit:
        raise
    except Exception as exc:  # a clean message and exit code 1 for any other failure
        print(f"hcrlhf: error{where}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        distributed.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
